"""The torch reference of top-k routing: the one definition the tests, the HF importer and the Triton
router's fallback use.

A ``TopKPolicy`` is the routing part of a spec's ``TopKRouter`` as a frozen value: score, selection
order, group limit, normalisation and scaling. ``route_topk`` follows the generated layer's steps
(``codegen_templates/moe_layer.py.j2`` spells the same steps out for one spec, with the score code
from ``semantics.scores``):

1. scores from the logits (``topk_then_score``: the logits themselves);
2. the selection score: scores + expert bias (the bias moves selection only);
3. group limit: keep the best ``topk_groups`` of ``num_groups`` groups per token (by max, or by the
   sum of the top ``top_n``); experts of other groups get -inf, so no bias can select them (a limit that
   keeps every group masks nothing and is no step, ``limits_groups``);
4. top-k of the selection score; weights are the chosen experts' scores (``topk_then_score``:
   softmax over the chosen logits, which sums to 1 already), optionally normalised to sum 1, then scaled.

The router's own transforms around these steps (``TopKRouter.input_norm``, ``learned_logit_scale``,
``logit_softcap``, ``per_expert_scale``, ``learned_weight_scale``) and Phi-MoE's sparsemixer are defined here
too, one function each (``router_input``, ``cap_logits``, ``sparsemixer_route``); the generated layer spells the
same steps:

0. the router input: ``multiplier * weight * x / sqrt(mean(x^2) + eps)`` (norm in float32);
1. logits = input @ W^T (+ router bias), times the learned scale, then capped: ``c * tanh(logits / c)``;
   scores, selection and the expert bias then see the capped logits;
5. last, each chosen expert's weight times its learned per-expert scale, and every weight (a routed shared
   expert's too) times the learned scalar weight scale.

A router that is a small network (``TopKRouter.mlp``) runs its layers on the router input before
step 1's linear (``router_network``); its state step adds the previous layer's router state and keeps
the value there as this layer's.

Legend: T tokens, E experts, K experts per token, G groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .torch_forms import activate, rms_norm, scores

__all__ = ["TopKPolicy", "route_topk", "route_weights", "limits_groups", "group_limit", "choose_experts",
           "select_experts", "router_input", "modulo_hash_experts", "cap_logits", "sparsemixer_route", "router_network"]


@dataclass(frozen=True)
class TopKPolicy:
    """A top-k routing policy (the routing fields of ``spec.TopKRouter``; ``num_groups`` 0: no group limit)."""

    top_k: int
    score: str = "softmax"
    topk_then_score: bool = False
    normalize: bool = False
    scaling_factor: float = 1.0
    num_groups: int = 0
    topk_groups: int = 0
    group_score: str = "max"
    top_n: int = 0

    @classmethod
    def of_router(cls, r: Any) -> TopKPolicy:
        """The policy of a spec ``TopKRouter``; a group limit that keeps every group is no limit (``num_groups`` 0)."""
        g = r.groups if limits_groups(r.groups) else None
        return cls(r.top_k, r.score, r.topk_order == "topk_then_score", r.normalize, float(r.scaling_factor),
                   g.num_groups if g else 0, g.topk_groups if g else 0, g.group_score if g else "max",
                   g.top_n if g else 0)

    @property
    def divides_by_sum(self) -> bool:
        """Whether the weights are divided by their sum: ``normalize``, except after ``topk_then_score``, whose
        softmax over the chosen logits already sums to 1 (dividing would only round them again)."""
        return self.normalize and not self.topk_then_score

    def positional(self) -> tuple:
        """The fields in order: the positional form a ``torch.library`` op schema needs."""
        return (self.top_k, self.score, self.topk_then_score, self.normalize, float(self.scaling_factor),
                self.num_groups, self.topk_groups, self.group_score, self.top_n)


def limits_groups(groups: Any) -> bool:
    """Whether a spec ``GroupLimit`` (or None) leaves any expert out: keeping ``topk_groups`` of ``num_groups`` groups
    when they are as many keeps every group, so the step would mask nothing (its result is the same, bit for bit)."""
    return groups is not None and groups.topk_groups < groups.num_groups


def group_limit(choice_TE: Tensor, policy: TopKPolicy) -> Tensor:
    """The selection scores with experts outside each token's kept groups set to -inf."""
    E = choice_TE.shape[1]
    choice_TGX = choice_TE.view(-1, policy.num_groups, E // policy.num_groups)
    if policy.group_score == "max":
        group_TG = choice_TGX.amax(dim=-1)
    else:
        group_TG = choice_TGX.topk(policy.top_n, dim=-1).values.sum(dim=-1)
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, group_TG.topk(policy.topk_groups, dim=-1).indices,
                                                                    True)
    return choice_TGX.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(-1, E)


def route_topk(logits_TE: Tensor, policy: TopKPolicy, expert_bias_E: Tensor | None = None,
               shared: int = 0, bias_on_logits: bool = False) -> tuple[Tensor, Tensor]:
    """ids_TK [T, K] (best first) and weights_TK [T, K] of a top-k policy (weights differentiable in the logits).

    ``shared`` (``shared_experts.gate: router``): the last ``shared`` logits are shared experts' rows, scored
    with the others but never chosen; their weights follow the K chosen ones (weights [T, K + shared]),
    normalised and scaled together with them.
    ``bias_on_logits``: the expert bias is added to the logits rather than to the scores (selection only,
    ``ExpertBias.applies_to: logits``); with ``topk_then_score`` the two are the same.
    """
    scores_TX = logits_TE if policy.topk_then_score else scores(logits_TE, policy.score)
    E = logits_TE.shape[1] - shared
    scores_TE, shared_TS = scores_TX[:, :E], scores_TX[:, E:]
    biased_TE = logits_TE[:, :E] if bias_on_logits else scores_TE
    ids_TK = choose_experts(scores_TE if expert_bias_E is None else biased_TE + expert_bias_E, policy)
    return ids_TK, _weights(scores_TE, ids_TK, policy, shared_TS if shared else None)


def choose_experts(choice_TE: Tensor, policy: TopKPolicy) -> Tensor:
    """ids_TK [T, K], best first, from the selection scores: steps 3 and 4 up to the weights."""
    if policy.num_groups:
        choice_TE = group_limit(choice_TE, policy)
    return torch.topk(choice_TE, policy.top_k, dim=-1).indices


def select_experts(scores_TE: Tensor, policy: TopKPolicy, expert_bias_E: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The choice of a score-then-top-k policy and the chosen experts' scores, unweighted: ids_TK
    (best first) and scores_TE gathered at them, before normalising and scaling (what
    ``runtime.route_select`` computes)."""
    ids_TK = choose_experts(scores_TE if expert_bias_E is None else scores_TE + expert_bias_E, policy)
    return ids_TK, scores_TE.gather(1, ids_TK)


def route_weights(logits_TE: Tensor, ids_TK: Tensor, policy: TopKPolicy) -> Tensor:
    """Weights of the chosen experts ``ids_TK`` (differentiable in the logits)."""
    return _weights(logits_TE if policy.topk_then_score else scores(logits_TE, policy.score), ids_TK, policy)


def _weights(scores_TE: Tensor, ids_TK: Tensor, policy: TopKPolicy, shared_TS: Tensor | None = None) -> Tensor:
    w_TK = scores_TE.gather(1, ids_TK)
    if shared_TS is not None:
        w_TK = torch.cat([w_TK, shared_TS], dim=-1)
    if policy.topk_then_score:
        w_TK = torch.softmax(w_TK, dim=-1)
    if policy.divides_by_sum:
        w_TK = w_TK / (w_TK.sum(dim=-1, keepdim=True) + 1e-20)
    if policy.scaling_factor != 1.0:
        w_TK = w_TK * policy.scaling_factor
    return w_TK


def router_input(x_TD: Tensor, kind: str, eps: float, weight_D: Tensor | None, multiplier: float) -> Tensor:
    """What the router sees (``TopKRouter.input_norm``): ``multiplier * weight * rms(x)`` in float32, where
    kind 'none' skips the norm. The result is float32; the logits are computed from it in the router dtype."""
    xf_TD = x_TD.float()
    if kind == "rms":
        xf_TD = xf_TD * torch.rsqrt(xf_TD.pow(2).mean(-1, keepdim=True) + eps)
    if weight_D is not None:
        xf_TD = xf_TD * weight_D.float()
    return xf_TD * multiplier if multiplier != 1.0 else xf_TD


def modulo_hash_experts(token_ids_T: Tensor, num_experts: int, top_k: int) -> Tensor:
    """[T, K] the experts hash routing by formula (``HashRouter.method: modulo``) sends each token id to:
    ``(id + k * E // K) mod E`` for k < K (the generated layer spells the same step out)."""
    offsets_K = torch.arange(top_k, device=token_ids_T.device) * (num_experts // top_k)
    return (token_ids_T.unsqueeze(-1) + offsets_K) % num_experts


def cap_logits(logits_TE: Tensor, cap: float) -> Tensor:
    """``cap * tanh(logits / cap)``: bounds the logits to (-cap, cap), near the identity for small ones."""
    return torch.tanh(logits_TE / cap) * cap


def sparsemixer_route(logits_TE: Tensor, top_k: int, jitter_eps: float) -> tuple[Tensor, Tensor]:
    """Phi-MoE's sparsemixer at inference: ids_TK (largest logit first) and weights_TK, differentiable in the logits.

    Choice k is the largest logit m among the experts not chosen before. Its weight is the softmax, at that
    expert, over the experts not chosen before whose logit s is close to m: (m - s) / max(|s|, m) <= 2 * eps.
    (Training in Phi-MoE samples the choices and estimates their gradient; that is not reproduced here.)
    """
    left_TE = logits_TE
    ids, weights = [], []
    for _ in range(top_k):
        m_T1, id_T1 = left_TE.detach().max(dim=-1, keepdim=True)
        far_TE = (m_T1 - logits_TE.detach()) / logits_TE.detach().abs().clamp(min=m_T1) > 2 * jitter_eps
        gates_TE = torch.softmax(left_TE.masked_fill(far_TE, float("-inf")), dim=-1)
        ids.append(id_T1)
        weights.append(gates_TE.gather(1, id_T1))
        left_TE = left_TE.scatter(1, id_T1, float("-inf"))
    return torch.cat(ids, dim=-1), torch.cat(weights, dim=-1)


def router_network(x_TD: Tensor, layers: list[dict[str, Any]], params: list[dict[str, Tensor]],
                   state_TH: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """A router network (``TopKRouter.mlp``, its layers as dicts) on the router input: (its output, the
    router state at its state step or None). ``params[i]`` holds layer i's tensors: a linear's ``weight``
    (and ``bias``), a norm's ``weight``, a receiving state step's ``scale``; ``state_TH`` is the previous
    layer's state (None adds nothing)."""
    h, state = x_TD, None
    for layer, p in zip(layers, params):
        op = layer["op"]
        if op == "linear":
            h = torch.nn.functional.linear(h, p["weight"], p.get("bias"))
        elif op == "rms_norm":
            h = rms_norm(h, layer.get("eps", 1e-6), p["weight"])
        elif op == "activation":
            h = activate(h, layer["function"])
        else:
            if layer.get("receive", True) and state_TH is not None:
                h = h + state_TH.to(h.dtype) * p["scale"]
            state = h
    return h, state
