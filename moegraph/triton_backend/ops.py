"""Custom ops of the Triton backend: ``torch.ops.moegraph_triton.{expert_mlp, route_topk}``.

``moegraph_triton::expert_mlp`` has exactly the signature and semantics of ``moegraph::expert_mlp``
(see ``moegraph.ops``); generated layers of backend "triton" call it. Like the torch op it is opaque
to FX and ``torch.compile`` (fake implementation) and differentiable: its backward recomputes the
torch reference with autograd, as ``moegraph.ops`` does.

``moegraph_triton::route_topk`` is the router kernel of a top-k policy; ``route_topk_reference`` is
its torch fallback, spelled exactly like the generated torch routing code. Its backward
differentiates the weights of the chosen experts with respect to the logits (the choice itself is
piecewise constant).
"""

from __future__ import annotations

import ast
import operator

import torch
from torch import Tensor

from .. import ops as torch_ops
from ..oplib import opaque_op
from ..spec import score_expression
from . import kernels

__all__ = ["expert_mlp", "route_topk", "route_topk_reference", "route_weights_reference"]


#: Grouped expert MLP over assignments with Triton kernels; arguments and result as ``moegraph::expert_mlp``
#: (same fake implementation, and the same backward: recomputation of the torch reference).
expert_mlp = torch_ops.define_expert_op("moegraph_triton::expert_mlp", kernels.expert_mlp)


# ----------------------------------------------------------------------------------------------
# Router
# ----------------------------------------------------------------------------------------------


_TORCH_FUNCS = {
    "sigmoid": torch.sigmoid,
    "softplus": torch.nn.functional.softplus,
    "sqrt": torch.sqrt,
    "exp": torch.exp,
    "log": torch.log,
    "log1p": torch.log1p,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "abs": torch.abs,
    "square": torch.square,
}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}


def _eval_score(node: ast.AST, x: Tensor):
    """Evaluate a spec-validated score expression of ``x`` with the torch functions of generated code."""
    if isinstance(node, ast.Expression):
        return _eval_score(node.body, x)
    if isinstance(node, ast.Name):
        return x
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp):
        v = _eval_score(node.operand, x)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        return _BINOPS[type(node.op)](_eval_score(node.left, x), _eval_score(node.right, x))
    if isinstance(node, ast.Call):
        return _TORCH_FUNCS[node.func.id](_eval_score(node.args[0], x))
    raise ValueError(f"unsupported score expression node {ast.dump(node)}")


def _scores(logits_TE: Tensor, score: str) -> Tensor:
    if score == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    return _eval_score(ast.parse(score_expression(score), mode="eval"), logits_TE)


def route_topk_reference(logits_TE: Tensor, expert_bias_E: Tensor | None, top_k: int, score: str,
                         topk_then_score: bool, normalize: bool, scaling_factor: float, num_groups: int,
                         topk_groups: int, group_score: str, top_n: int) -> tuple[Tensor, Tensor]:
    """Torch routing, step for step as the generated torch layer (``num_groups`` 0: no group limit)."""
    E = logits_TE.shape[1]
    scores_TE = logits_TE if topk_then_score else _scores(logits_TE, score)
    choice_TE = scores_TE if expert_bias_E is None else scores_TE + expert_bias_E
    if num_groups:
        choice_TGX = choice_TE.view(-1, num_groups, E // num_groups)
        if group_score == "max":
            group_TG = choice_TGX.amax(dim=-1)
        else:
            group_TG = choice_TGX.topk(top_n, dim=-1).values.sum(dim=-1)
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, group_TG.topk(topk_groups, dim=-1).indices, True)
        choice_TE = choice_TGX.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(-1, E)
    ids_TK = torch.topk(choice_TE, top_k, dim=-1).indices
    return ids_TK, route_weights_reference(logits_TE, ids_TK, score, topk_then_score, normalize, scaling_factor)


def route_weights_reference(logits_TE: Tensor, ids_TK: Tensor, score: str, topk_then_score: bool, normalize: bool,
                            scaling_factor: float) -> Tensor:
    """Weights of the chosen experts ``ids_TK`` (differentiable in the logits)."""
    if topk_then_score:
        w_TK = torch.softmax(logits_TE.gather(1, ids_TK), dim=-1)
    else:
        w_TK = _scores(logits_TE, score).gather(1, ids_TK)
    if normalize:
        w_TK = w_TK / (w_TK.sum(dim=-1, keepdim=True) + 1e-20)
    if scaling_factor != 1.0:
        w_TK = w_TK * scaling_factor
    return w_TK


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
    """
    args = (top_k, score, topk_then_score, normalize, scaling_factor, num_groups, topk_groups, group_score, top_n)
    with torch.no_grad():
        if kernels.router_supported(logits_TE.shape[1], top_k, score) is not None:
            # Beyond the kernel (thousands of experts): the torch fallback, same results.
            ids_TK, w_TK = route_topk_reference(logits_TE, expert_bias_E, *args)
            return ids_TK, w_TK.to(logits_TE.dtype)
        return kernels.route_topk(logits_TE, expert_bias_E, *args)


@route_topk.register_fake
def _(logits_TE, expert_bias_E, top_k, score, topk_then_score, normalize, scaling_factor, num_groups, topk_groups,
      group_score, top_n):
    T = logits_TE.shape[0]
    return logits_TE.new_empty(T, top_k, dtype=torch.int64), logits_TE.new_empty(T, top_k)


def _route_setup(ctx, inputs, output):
    logits_TE, _, _, score, topk_then_score, normalize, scaling_factor = inputs[:7]
    ctx.save_for_backward(logits_TE, output[0])
    ctx.policy = (score, topk_then_score, normalize, scaling_factor)


def _route_backward(ctx, grad_ids, grad_w_TK):
    logits_TE, ids_TK = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0] and grad_w_TK is not None:
        with torch.enable_grad():
            leaf = logits_TE.detach().requires_grad_(True)
            w_TK = route_weights_reference(leaf, ids_TK, *ctx.policy)
            (grad_logits,) = torch.autograd.grad(w_TK, leaf, grad_w_TK)
    return (grad_logits,) + (None,) * 10


route_topk.register_autograd(_route_backward, setup_context=_route_setup)
