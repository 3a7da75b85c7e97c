"""Step 2-3: routing semantics in the spec's terms, identified as the one that reproduces the probe."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import UnsupportedBlock
from ..semantics.routing import TopKPolicy, cap_logits, route_topk, sparsemixer_route
from .anatomy import BlockAnatomy
from .probe import Probe
from .vocab import _HF_SCORES, _NORMALIZE, _SCALING, _SCORE, _SCORE_FNS, _TOP_K, _attr


@dataclass(frozen=True)
class Routing:
    """A top-k routing in the spec language's terms (see TopKRouter)."""

    top_k: int
    score: str | None = "softmax"
    topk_order: str = "score_then_topk"
    normalize: bool = False
    scaling_factor: float = 1.0
    groups: tuple[int, int, str, int] | None = None  # (num_groups, topk_groups, group_score, top_n)
    expert_bias: bool = False
    hash_vocab: int | None = None  # set: experts from a [hash_vocab, top_k] token id table (score None: 1/K each)
    on_input: bool = False  # the weight scales the expert's input, expert(w * x) (Llama 4), not its output
    capacity: tuple[int, str, str] | None = None  # (tokens, per, drop_policy): over-full experts drop tokens
    logit_softcap: float | None = None  # logits capped to c * tanh(logits / c) before scoring (Laguna)
    bias_on_logits: bool = False  # the selection bias is added to the logits, not the scores (Kolibri)
    sparsemixer_eps: float | None = None  # Phi-MoE's sparsemixer weighs the choices (inference form)
    per_expert_scale: bool = False  # the block's E-sized tensor scales each chosen expert's weight (Gemma 4)
    weight_scale: bool = False  # a learned scalar of the block multiplies every weight (Inkling's global_scale)
    input_norm: tuple[str, float, bool, float] | None = None  # router.input_norm: kind, eps, weight, multiplier
    logit_multiplier: float | None = None  # a constant on the logits of a bias-free router (Muse Spark), which the
    # spec writes as a multiplier on the router input (W (c x) == c (W x)): input_norm {kind: none, multiplier: c}

    def describe(self) -> str:
        cap = (f", capacity {self.capacity[0]} tokens per {self.capacity[1]}" if self.capacity else "")
        return self._describe() + (", weight on the expert input" if self.on_input else "") + cap

    def _describe(self) -> str:
        if self.hash_vocab is not None:
            s = f"top-{self.top_k} from a token id table"
            if self.score is None:
                return s + ", weight 1/K each"
            s += f", weighted by {self.score}" + (", normalised" if self.normalize else "")
            return s + (f", x{self.scaling_factor:g}" if self.scaling_factor != 1.0 else "")
        s = f"top-{self.top_k} {self.score}"
        if self.topk_order == "topk_then_score":
            s = f"top-{self.top_k} logits then softmax"
        if self.sparsemixer_eps is not None:
            s = f"top-{self.top_k} sparsemixer (eps {self.sparsemixer_eps:g})"
        if self.logit_softcap is not None:
            s += f" of logits capped at {self.logit_softcap:g}"
        if self.expert_bias:
            s += " + selection bias" + (" on the logits" if self.bias_on_logits else "")
        if self.input_norm is not None:
            s += f", router input {'rms-normed' if self.input_norm[0] == 'rms' else 'scaled'}"
        if self.logit_multiplier is not None:
            s += f", logits x{self.logit_multiplier:g}"
        if self.per_expert_scale:
            s += ", per-expert scales"
        if self.weight_scale:
            s += ", learned weight scale"
        if self.groups:
            g = self.groups
            s += f", groups {g[1]}/{g[0]} by {g[2] if g[2] == 'max' else f'sum of top-{g[3]}'}"
        if self.normalize:
            s += ", normalised"
        if self.scaling_factor != 1.0:
            s += f", x{self.scaling_factor:g}"
        return s

    def policy(self) -> TopKPolicy:
        G, M, how, n = self.groups or (0, 0, "max", 0)
        return TopKPolicy(self.top_k, self.score, self.topk_order == "topk_then_score", self.normalize,
                          float(self.scaling_factor), G, M, how, n)

    def router_dict(self) -> dict[str, Any]:
        if self.hash_vocab is not None:
            d = {"type": "hash", "method": "table", "top_k": self.top_k, "vocab_size": self.hash_vocab}
            if self.score is not None:
                d.update(score=self.score, normalize=self.normalize)
                if self.scaling_factor != 1.0:
                    d["scaling_factor"] = self.scaling_factor
            return d
        d: dict[str, Any] = {"type": "topk", "top_k": self.top_k, "score": self.score}
        if self.topk_order != "score_then_topk":
            d["topk_order"] = self.topk_order
        d["normalize"] = self.normalize
        if self.scaling_factor != 1.0:
            d["scaling_factor"] = self.scaling_factor
        if self.logit_softcap is not None:
            d["logit_softcap"] = self.logit_softcap
        if self.sparsemixer_eps is not None:
            d["sparsemixer"] = {"jitter_eps": self.sparsemixer_eps}
        if self.per_expert_scale:
            d["per_expert_scale"] = True
        if self.weight_scale:
            d["learned_weight_scale"] = True
        if self.input_norm is not None:
            kind, eps, weight, mult = self.input_norm
            d["input_norm"] = {"kind": kind, "eps": eps, "weight": weight, "multiplier": mult}
        elif self.logit_multiplier is not None:
            d["input_norm"] = {"kind": "none", "multiplier": self.logit_multiplier}
        if self.groups:
            G, M, how, n = self.groups
            d["groups"] = {"num_groups": G, "topk_groups": M, "group_score": how}
            if how == "sum_topn":
                d["groups"]["top_n"] = n
        if self.capacity:
            C, per, policy = self.capacity
            d["capacity"] = {"tokens": C, "per": per, "drop_policy": policy}
        return d


def route(logits_TE: Tensor, r: Routing, expert_bias_E: Tensor | None, shared: int = 0) -> tuple[Tensor, Tensor]:
    """(ids_TK, weights_TK) of a routing: the torch reference of ``moegraph.semantics.routing`` (``shared``: the
    last logits weigh shared experts; their weights follow the K chosen ones)."""
    bias = expert_bias_E if (r.expert_bias and expert_bias_E is not None) else None
    if r.logit_multiplier is not None:
        logits_TE = logits_TE * r.logit_multiplier
    if r.logit_softcap is not None:
        logits_TE = cap_logits(logits_TE, r.logit_softcap)
    if r.sparsemixer_eps is not None:
        ids_TK, w_TK = sparsemixer_route(logits_TE, r.top_k, r.sparsemixer_eps)
        w_TK = w_TK * r.scaling_factor
    else:
        ids_TK, w_TK = route_topk(logits_TE, r.policy(), bias, shared, bias_on_logits=r.bias_on_logits)
    if r.per_expert_scale and expert_bias_E is not None:  # the E-sized tensor is a scale, not a selection bias
        K = ids_TK.shape[1]  # (shared experts' weights, after the K chosen ones, are not scaled)
        w_TK = torch.cat([w_TK[:, :K] * expert_bias_E[ids_TK], w_TK[:, K:]], dim=-1)
    return ids_TK, w_TK


def _same_routing(ids_a: Tensor, w_a: Tensor, ids_b: Tensor, w_b: Tensor) -> tuple[bool, str]:
    sa, pa = ids_a.sort(-1)
    sb, pb = ids_b.sort(-1)
    if not torch.equal(sa, sb):
        bad = int((sa != sb).any(-1).nonzero()[0, 0])
        return False, f"token {bad}: experts {sa[bad].tolist()} vs {sb[bad].tolist()}"
    wa, wb = w_a.gather(1, pa), w_b.gather(1, pb)
    if not torch.allclose(wa, wb, rtol=1e-4, atol=1e-7):
        return False, f"weights differ by up to {float((wa - wb).abs().max()):.3g}"
    return True, ""


@dataclass
class Declared:
    """Routing as the config declares it (None where the config says nothing)."""

    top_k: int | None
    score: str | None
    normalize: bool | None
    scaling: float | None
    groups: tuple[int, int] | None
    group_method: str | None  # "max" / "sum_topn" when topk_method says, else None
    greedy: bool  # topk_method == "greedy": groups are configured but not used


def declared_routing(cfg: Any) -> Declared:
    k = _attr(cfg, _TOP_K)
    score = _attr(cfg, _SCORE)
    if isinstance(score, str):
        score = _HF_SCORES.get(score.lower().replace("-", "_"), score)
    norm = _attr(cfg, _NORMALIZE)
    scaling = _attr(cfg, _SCALING)
    G, M = getattr(cfg, "n_group", None), getattr(cfg, "topk_group", None)
    method = getattr(cfg, "topk_method", None)
    gm = {"group_limited_greedy": "max", "noaux_tc": "sum_topn"}.get(method or "")
    groups = (int(G), int(M)) if isinstance(G, int) and isinstance(M, int) and G > 1 else None
    return Declared(
        top_k=int(k) if isinstance(k, int) else None, score=score if isinstance(score, str) else None,
        normalize=bool(norm) if norm is not None else None,
        scaling=float(scaling) if isinstance(scaling, (int, float)) and not isinstance(scaling, bool) else None,
        groups=groups, group_method=gm, greedy=method == "greedy",
    )


def _candidates(dec: Declared, K: int, E: int, has_bias: bool, constants: dict[str, list[float]]
                ) -> Iterator[Routing]:
    """Routings in the spec language, the config's declaration first, then its nearest variants; then the
    same with the router's transforms whose constants the block holds (``constants``: a logit softcap, a
    sparsemixer's jitter eps), and a selection bias on the logits rather than the scores."""
    plain = list(_plain_candidates(dec, K, E, has_bias))
    yield from plain
    if has_bias:  # the E-sized tensor may scale the chosen experts' weights instead of biasing selection
        plain += [dataclasses.replace(r, per_expert_scale=True) for r in plain if not r.expert_bias]
        yield from (r for r in plain if r.per_expert_scale)
    if has_bias:
        yield from (dataclasses.replace(r, bias_on_logits=True) for r in plain
                    if r.expert_bias and r.topk_order == "score_then_topk")
    for cap in constants.get("softcap", []):
        for r in plain:
            yield dataclasses.replace(r, logit_softcap=cap)
            if r.expert_bias and r.topk_order == "score_then_topk":
                yield dataclasses.replace(r, logit_softcap=cap, bias_on_logits=True)
    for eps in constants.get("jitter", []):
        for cap in [None, *constants.get("softcap", [])]:
            yield Routing(top_k=K, sparsemixer_eps=eps, logit_softcap=cap)
    for mult in constants.get("multiplier", []):  # (gathered only for a bias-free router that sees the block input)
        for r in plain:
            yield dataclasses.replace(r, logit_multiplier=mult)


def _plain_candidates(dec: Declared, K: int, E: int, has_bias: bool) -> Iterator[Routing]:
    scores = [dec.score] if dec.score in _SCORE_FNS else []
    scores += [s for s in ("softmax", "sigmoid") if s not in scores]
    norms = [dec.normalize] if dec.normalize is not None else [False]
    norms += [n for n in (False, True) if n not in norms]
    groups: list[tuple[int, int, str, int] | None] = []
    if dec.groups and not dec.greedy and E % dec.groups[0] == 0:
        G, M = dec.groups
        per = E // G
        methods = [dec.group_method] if dec.group_method else ["sum_topn" if has_bias else "max"]
        methods += [m for m in ("max", "sum_topn") if m not in methods]
        for m in methods:
            if m == "sum_topn" and per < 2:
                continue
            if M * per >= K:
                groups.append((G, M, m, 2))  # sum_topn: the top-2 of each group, as DeepSeek-V3
    groups.append(None)
    biases = [True, False] if has_bias else [False]
    for eb in biases:
        for g in groups:
            for s in scores:
                for order in ("score_then_topk", "topk_then_score"):
                    if order == "topk_then_score" and s != "softmax":
                        continue
                    for n in norms:
                        r = Routing(top_k=K, score=s, topk_order=order, normalize=n, groups=g, expert_bias=eb)
                        if r.normalize and not r.policy().divides_by_sum:
                            # topk_then_score: the softmax over the chosen logits sums to 1, so normalize divides
                            # nothing; the reading without it is the same routing, and the one tried.
                            continue
                        yield r


def identify_routing(probe: Probe, cfg: Any, block_class: str) -> tuple[Routing, list[str]]:
    """The routing that reproduces the probe exactly, declared form first; notes on deviations."""
    dec = declared_routing(cfg) if cfg is not None else Declared(None, None, None, None, None, None, False)
    if probe.uses_token_ids and probe.shared_weights_TS is not None:
        raise UnsupportedBlock("its routing depends on the token ids and its router also weighs its shared experts; "
                               "the spec weighs shared experts by router rows beside a topk router only", block_class)
    if probe.uses_token_ids:
        r, notes = _identify_hash_routing(probe, dec, block_class)
    else:
        r, notes = _identify_topk_routing(probe, dec, block_class)
    if probe.routed_scale != 1.0:
        # c * sum_k w_k expert_k(x) == sum_k (c w_k) expert_k(x): the block's routed-output scale is a routing scale.
        if r.hash_vocab is not None and r.score is None:
            raise UnsupportedBlock("it scales the routed output of a 1/K hash routing; the spec's hash weights are "
                                   "1/K exactly", block_class)
        scale = r.scaling_factor * probe.routed_scale
        r = dataclasses.replace(r, scaling_factor=float(f"{scale:.6g}"))
        notes = notes + [f"the block scales the routed output by {probe.routed_scale:g}; folded into the routing "
                         "weights (scaling_factor)"]
    if probe.capacity is not None:
        if r.hash_vocab is not None:
            raise UnsupportedBlock("it routes by a token table and drops tokens beyond an expert capacity; the spec's "
                                   "capacity belongs to a topk router", block_class)
        r = dataclasses.replace(r, capacity=probe.capacity)
    if probe.router_input is not None:
        kind, eps, weight, mult = probe.router_input
        r = dataclasses.replace(r, input_norm=(kind, eps, weight is not None, mult))
    if probe.weight_scale is not None:  # (read with the scale at one: scaling_factor is the block's constant alone)
        r = dataclasses.replace(r, weight_scale=True)
    return (dataclasses.replace(r, on_input=True) if probe.input_scaled else r), notes


def _identify_topk_routing(probe: Probe, dec: Declared, block_class: str) -> tuple[Routing, list[str]]:
    K = probe.ids_TK.shape[1]
    S = 0 if probe.shared_weights_TS is None else probe.shared_weights_TS.shape[1]  # router rows of shared experts
    E = probe.logits_TE.shape[1] - S
    notes: list[str] = []
    if dec.top_k is not None and dec.top_k != K:
        notes.append(f"config says top-{dec.top_k} but the block routes to {K} experts; following the block")
    first_mismatch = None
    beside_mismatch = None  # a routing that fits all but what the block adds beside its experts

    def weights_in_order(ids: Tensor, w: Tensor, shared_w: Tensor | None) -> Tensor:
        # The chosen experts' weights by expert id, then the shared experts' (one order for both sides).
        wk = w[:, :K].gather(1, ids.sort(-1).indices)
        return wk if shared_w is None else torch.cat([wk, shared_w], dim=-1)

    probe_ids, probe_w = probe.ids_TK, probe.weights_TK
    if probe.zero_from is not None:  # zero-expert choices, however the block reports them, read as one (Zaya)
        probe_ids, probe_w = skips_as_zero_expert(probe_ids, probe_w, probe.zero_from, True)
        probe = dataclasses.replace(probe, ids_TK=probe_ids, weights_TK=probe_w)

    def route_read(logits_TE: Tensor, r: Routing) -> tuple[Tensor, Tensor]:
        ids, w = route(logits_TE, r, probe.expert_bias_E, S)
        if probe.zero_from is None:
            return ids, w
        ids_k, w_k = skips_as_zero_expert(ids[:, :K], w[:, :K], probe.zero_from, False)
        return ids_k, torch.cat([w_k, w[:, K:]], dim=-1)

    for cand in _candidates(dec, K, E, probe.expert_bias_E is not None, probe.constants):
        ids, w = route_read(probe.logits_TE, cand)
        if not torch.equal(ids.sort(-1).values, probe.ids_TK.sort(-1).values):
            if first_mismatch is None:
                first_mismatch = (cand, _same_routing(ids, w[:, :K], probe.ids_TK, probe.weights_TK)[1])
            continue
        # Same experts: the weights may differ by a constant factor (routed_scaling_factor).
        wa = weights_in_order(ids, w, w[:, K:] if S else None)
        wb = weights_in_order(probe.ids_TK, probe.weights_TK, probe.shared_weights_TS)
        scale, ratio = _common_scale(wb, wa)
        if scale is None:
            if first_mismatch is None:
                why = f"weights are not a constant multiple (ratio {float(ratio.min()):.4g}..{float(ratio.max()):.4g})"
                first_mismatch = (cand, why)
            continue
        scale, undeclared = _tidy_scale(scale, dec)
        if undeclared:
            notes.append(f"routing weights are scaled by {scale:g} (found by probing; config says "
                         f"{dec.scaling if dec.scaling is not None else 'nothing'})")
        r = Routing(**{**cand.__dict__, "scaling_factor": scale})
        ids, w = route_read(probe.logits_TE, r)
        ok, why = _same_routing(ids, w[:, :K], probe.ids_TK, probe.weights_TK)
        if not ok or S and not torch.allclose(w[:, K:], probe.shared_weights_TS, rtol=1e-4, atol=1e-7):
            continue
        if probe.beside_T is not None:  # what the block adds beside its experts must fit these weights too
            kinds, why = extra_choice_kinds(probe, dataclasses.replace(r, scaling_factor=scale * probe.routed_scale))
            if kinds is None:
                beside_mismatch = beside_mismatch or (r, why)
                continue
        notes += _deviation_notes(dec, r, probe.expert_bias_E is not None)
        return r, notes
    if beside_mismatch is not None:
        cand, why = beside_mismatch
        raise UnsupportedBlock(f"its routing ({cand.describe()}) reproduces the experts and weights it chooses, but "
                               f"{why}", block_class)
    cand, why = first_mismatch if first_mismatch else (None, "")
    tried = f"; the config's reading ({cand.describe()}) gives {why}" if cand else ""
    held = "; ".join(f"{k} {', '.join(f'{v:g}' for v in vs)}" for k, vs in probe.constants.items() if vs)
    raise UnsupportedBlock(
        "its routing is not one the spec language expresses: no top-k routing (softmax/sigmoid scores, "
        "optional selection bias on the scores or logits, group limit, normalisation, scaling, a logit softcap or "
        "sparsemixer with the constants the block holds"
        + (f": {held}" if held else ": none found") + f") reproduces the experts and weights it chooses{tried}",
        block_class,
    )


def _deviation_notes(dec: Declared, r: Routing, has_bias: bool) -> list[str]:
    notes = []
    # (after topk_then_score the weights sum to 1 with normalize or without: the config's flag changes nothing)
    if dec.normalize is not None and dec.normalize != r.normalize and r.topk_order == "score_then_topk":
        notes.append(f"config norm_topk_prob={dec.normalize} but the block {'does' if r.normalize else 'does not'} "
                     "normalise the top-k weights; following the block")
    if dec.score is not None and dec.score != r.score and r.topk_order == "score_then_topk":
        notes.append(f"config scoring_func={dec.score} but the block scores with {r.score}; following the block")
    if dec.groups and not dec.greedy and r.groups is None:
        notes.append(f"config n_group={dec.groups[0]}/topk_group={dec.groups[1]} but the block does not limit groups")
    if has_bias and not r.expert_bias and not r.per_expert_scale:
        notes.append("the block holds an expert-selection bias but does not use it")
    return notes


def extra_choice_kinds(probe: Probe, r: Routing) -> tuple[tuple[int, int] | None, str]:
    """((identity, zero) counts, "") of the router choices beyond the experts of a block that handles them around
    its experts (``probe.beside_T``), read from what it adds beside them: per token, the input times the weights
    (routing ``r``'s) of its identity choices; identity choices first, as the spec orders them.
    (None, why) when no such split explains it."""
    assert probe.beside_T is not None and probe.zero_from is not None, "a probe of a block handling its extra choices"
    E, R, K = probe.zero_from, probe.logits_TE.shape[1], probe.ids_TK.shape[1]
    ids, w = route(probe.logits_TE, r, probe.expert_bias_E)
    ids, w = ids[:, :K], w[:, :K].double()
    extra_TK = ids >= E
    # w_TZ[t, j]: the weight token t gives choice E + j; the identity choices' weight with n identity experts is
    # the sum of its first n columns
    w_TZ = torch.zeros(ids.shape[0], R - E, dtype=torch.float64)
    w_TZ.scatter_add_(1, (ids - E).clamp(min=0), torch.where(extra_TK, w, torch.zeros_like(w)))
    sums_TN = torch.cat([torch.zeros_like(w_TZ[:, :1]), w_TZ.cumsum(-1)], dim=-1)
    s_T = probe.beside_T.double().unsqueeze(-1)
    fits = ((sums_TN - s_T).abs() <= 1e-5 + 1e-4 * s_T.abs()).all(0).nonzero().flatten().tolist()
    if not fits:
        return None, (f"what it adds beside its experts for its {R - E} router choices beyond the {E} experts is not "
                      "the input times the weights of identity choices (then zero choices)")
    if len(fits) > 1:
        unseen = [E + j for j in range(fits[0], fits[-1])]
        return None, (f"its router choices {unseen[0]}..{unseen[-1]} beyond the {E} experts were never chosen in the "
                      "probe, so whether they are identity or zero experts is unknown")
    return (fits[0], R - E - fits[0]), ""


def read_extra_choices(anat: BlockAnatomy, probe: Probe, r: Routing) -> BlockAnatomy:
    """The anatomy with its identity/zero expert counts read from the block output, for a block that handles its
    router choices beyond the experts itself (``probe.beside_T``); as given otherwise."""
    if probe.beside_T is None:
        return anat
    kinds, why = extra_choice_kinds(probe, r)
    if kinds is None:
        raise UnsupportedBlock(why, anat.block_class)
    return dataclasses.replace(anat, identity_experts=kinds[0], zero_experts=kinds[1], extra_unread=None)


def skips_as_zero_expert(ids_TK: Tensor, w_TK: Tensor, zero_from: int, reported: bool) -> tuple[Tensor, Tensor]:
    """Choices of a zero expert (ids >= ``zero_from``) as (zero_from, weight 0): they add nothing whatever their
    weight. With ``reported`` (a block's own report) a weight of exactly 0 counts as such a choice too: Zaya
    reports its skip choice as (expert 0, weight 0)."""
    skip = ids_TK >= zero_from
    if reported:
        skip = skip | (w_TK == 0)
    return ids_TK.masked_fill(skip, zero_from), w_TK.masked_fill(skip, 0.0)


def _common_scale(w_probe_TK: Tensor, w_cand_TK: Tensor) -> tuple[float | None, Tensor]:
    """(c, ratios): c with w_probe == c * w_cand (same order; routed_scaling_factor), None if there is none.
    Entries where both are zero (zero-expert choices) say nothing about c."""
    live = (w_probe_TK != 0) | (w_cand_TK != 0)
    if not bool(live.all()) and bool(live.any()):
        w_probe_TK, w_cand_TK = w_probe_TK[live], w_cand_TK[live]
    ratio = w_probe_TK / torch.where(w_cand_TK.abs() < 1e-30, torch.full_like(w_cand_TK, 1e-30), w_cand_TK)
    scale = float(ratio.mean())
    ok = scale > 0 and torch.allclose(ratio, torch.full_like(ratio, scale), rtol=1e-4, atol=0)
    return (scale if ok else None), ratio


def _tidy_scale(scale: float, dec: Declared) -> tuple[float, bool]:
    """A probed scale as the spec writes it: the config's value or 1.0 when it is that, else rounded to
    6 digits (then True: the config did not declare it)."""
    if dec.scaling is not None and math.isclose(scale, dec.scaling, rel_tol=1e-4):
        return dec.scaling, False
    if math.isclose(scale, 1.0, rel_tol=1e-5):
        return 1.0, False
    return float(f"{scale:.6g}"), True


def _identify_hash_routing(probe: Probe, dec: Declared, block_class: str) -> tuple[Routing, list[str]]:
    """Routing by a token id -> experts table: the experts must be the table's rows for the probe's ids;
    the weights 1/K each, or the router's scores of those experts (normalised or not) times a constant."""
    table, tid = probe.token_table_VK, probe.token_ids_T
    if table is None or tid is None:
        raise UnsupportedBlock(f"its routing depends on the token ids its forward takes ({probe.token_arg}) but it "
                               "holds no token id -> experts table; only table hash routing is read", block_class)
    ids = table[tid].long()
    K = table.shape[1]
    if not torch.equal(ids.sort(-1).values, probe.ids_TK.sort(-1).values):
        raise UnsupportedBlock(f"its routing depends on the token ids ({probe.token_arg}) but the experts it chooses "
                               "are not the rows of its token table", block_class)
    scores = [dec.score] if dec.score in _SCORE_FNS else []
    candidates = [(None, False)] + [(s, n) for s in scores + [s for s in _SCORE_FNS if s not in scores]
                                    for n in (True, False)]
    wb = probe.weights_TK.gather(1, probe.ids_TK.sort(-1).indices)
    for score, norm in candidates:
        if score is None:
            w = torch.full(ids.shape, 1.0 / K)
        else:
            w = _SCORE_FNS[score](probe.logits_TE).gather(1, ids)
            w = w / (w.sum(-1, keepdim=True) + 1e-20) if norm else w
        scale, _ = _common_scale(wb, w.gather(1, ids.sort(-1).indices))
        if scale is None or score is None and not math.isclose(scale, 1.0, rel_tol=1e-5):
            continue  # (uniform weights scaled: not a hash routing the spec has)
        scale, _ = _tidy_scale(scale, dec)
        return Routing(top_k=K, score=score, normalize=norm, scaling_factor=scale, hash_vocab=table.shape[0]), []
    raise UnsupportedBlock(f"its experts come from its token table but their weights are neither 1/K nor a router "
                           f"score ({', '.join(_SCORE_FNS)}, normalised or not) times a constant", block_class)
