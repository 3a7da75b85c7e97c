"""A plain, slow, loop-per-token MoE reference written from the papers' definitions.

It reads only the spec dict and the layer's parameter tensors; it shares no code with moegraph's
runtime, codegen or ops, so agreement with it is evidence, not tautology.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def act(name: str, v: torch.Tensor) -> torch.Tensor:
    return {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "relu": F.relu,
        "relu2": lambda t: F.relu(t) ** 2,
        # the inline expressions the router-network tests use
        "x * sigmoid(x)": lambda t: t * torch.sigmoid(t),
        "clamp(x, -1, 1)": lambda t: t.clamp(-1, 1),
        "max(x, 0.1 * x) + min(x, 0.5)": lambda t: torch.maximum(t, 0.1 * t) + t.clamp(max=0.5),
        "clamp(x, min=-1 + 0.5, max=exp(1) / 4)": lambda t: t.clamp(-0.5, math.e / 4),
        "max(x, -sigmoid(1)) + x * sigmoid(0)": lambda t: t.clamp(min=-1 / (1 + math.exp(-1))) + t / 2,
    }[name](v)


ACT = {"swiglu": ("silu", True), "geglu": ("gelu", True), "geglu_tanh": ("gelu_tanh", True), "reglu": ("relu", True),
       "silu": ("silu", False), "gelu": ("gelu", False), "gelu_tanh": ("gelu_tanh", False), "relu": ("relu", False),
       "relu2": ("relu2", False)}


def activated(h, activation, gate_clamp=None, up_clamp=None):
    """The expert nonlinearity on the up projection h ([2F]: gate then up, if gated)."""
    name, gated = ACT[activation]
    if gated:
        f = h.shape[0] // 2
        g, u = h[:f], h[f:]
        if gate_clamp is not None:
            g = torch.clamp(g, max=gate_clamp)
        if up_clamp is not None:
            u = torch.clamp(u, -up_clamp, up_clamp)
        return act(name, g) * u
    return act(name, h)


def expert(x_D, w_up, w_down, b_up, b_down, activation, gate_clamp=None, up_clamp=None):
    h = w_up @ x_D + (b_up if b_up is not None else 0)
    return w_down @ activated(h, activation, gate_clamp, up_clamp) + (b_down if b_down is not None else 0)


def score(name: str, logits: torch.Tensor) -> torch.Tensor:
    if name == "softmax":
        return torch.softmax(logits, -1)
    if name == "sigmoid":
        return torch.sigmoid(logits)
    if name == "sqrt_softplus":
        return torch.sqrt(F.softplus(logits))
    if name == "softplus":
        return F.softplus(logits)
    if name == "tanh":
        return torch.tanh(logits)
    if name == "sqrt(softplus(x)) + 0.5 * tanh(x)":  # the custom expression used in the tests
        return torch.sqrt(F.softplus(logits)) + 0.5 * torch.tanh(logits)
    if name == "sqrt(softplus(x - sigmoid(0))) + 0.5 * tanh(x * sqrt(4))":
        return torch.sqrt(F.softplus(logits - 0.5)) + 0.5 * torch.tanh(2 * logits)
    raise NotImplementedError(name)


def route_token(spec: dict, logits: torch.Tensor, bias: torch.Tensor | None, shared: int = 0):
    """Top-k routing of one token: returns list of (expert, weight). ``shared``: the last ``shared`` logits are
    shared experts' (shared_experts.gate: router), returned after the chosen ones as (E + s, weight)."""
    r = spec["moe"]["router"]
    E = logits.shape[0] - shared
    K = r["top_k"]
    sc = r.get("score", "softmax")
    if r.get("sparsemixer"):
        return sparsemixer_token(logits, K, r["sparsemixer"]["jitter_eps"], r.get("scaling_factor", 1.0))
    if r.get("topk_order") == "topk_then_score":
        choice = logits[:E] + (bias if bias is not None else 0)
        chosen = sorted(range(E), key=lambda e: -float(choice[e].detach()))[:K] + list(range(E, E + shared))
        w = torch.softmax(torch.stack([logits[e] for e in chosen]), 0)
        weights = list(w)
    else:
        s = score(sc, logits)  # over every row, the shared experts' too
        s, s_shared = s[:E], s[E:]
        on_logits = (r.get("expert_bias") or {}).get("applies_to") == "logits"  # Kolibri: bias on the logits
        choice = (logits[:E] if on_logits else s) + (bias if bias is not None else 0)
        allowed = list(range(E))
        g = r.get("groups")
        if g:
            G, per = g["num_groups"], E // g["num_groups"]
            gscores = []
            for gi in range(G):
                members = sorted((float(choice[gi * per + j].detach()) for j in range(per)), reverse=True)
                gscores.append(members[0] if g.get("group_score", "max") == "max" else sum(members[: g.get("top_n", 2)]))
            kept = sorted(range(G), key=lambda gi: -gscores[gi])[: g["topk_groups"]]
            allowed = [e for e in range(E) if e // per in kept]
        chosen = sorted(allowed, key=lambda e: -float(choice[e].detach()))[:K]
        weights = [s[e] for e in chosen] + list(s_shared)
        chosen = chosen + list(range(E, E + shared))
    if r.get("normalize"):
        tot = sum(weights) + 1e-20
        weights = [w / tot for w in weights]
    weights = [w * r.get("scaling_factor", 1.0) for w in weights]
    return list(zip(chosen, weights))


def sparsemixer_token(logits: torch.Tensor, K: int, eps: float, scale: float):
    """Phi-MoE's sparsemixer at inference, one token, from the paper's description: pick the best expert left; its
    weight is its softmax among the experts left whose logits lie within a relative 2 * eps of its own."""
    left = list(range(logits.shape[0]))
    out = []
    for _ in range(K):
        best = max(left, key=lambda e: float(logits[e].detach()))
        m = float(logits[best].detach())
        near = [e for e in left if (m - float(logits[e].detach())) / max(abs(float(logits[e].detach())), m) <= 2 * eps]
        w = torch.exp(logits[best]) / sum(torch.exp(logits[e]) for e in near)
        out.append((best, w * scale))
        left.remove(best)
    return out


def router_network_token(mlp: list, layer, h: torch.Tensor, state_in: torch.Tensor | None):
    """One token through a router network (router.mlp), layer by layer as the spec describes it: returns (output,
    the value at the state step or None). Written out: y = W h + b, h / sqrt(mean(h^2) + eps) * w, act(h),
    h + scale * previous state."""
    state = None
    for i, step in enumerate(mlp):
        p = layer.router.mlp[i]
        if step["op"] == "linear":
            h = p.weight @ h + (p.bias if step.get("bias") else 0)
        elif step["op"] == "rms_norm":
            h = h / torch.sqrt((h * h).mean() + step.get("eps", 1e-6)) * p.weight
        elif step["op"] == "activation":
            h = act(step["function"], h)
        else:
            if step.get("receive", True) and state_in is not None:
                h = h + p.scale * state_in
            state = h
    return h, state


def router_logits(r: dict, layer, x_D: torch.Tensor, state_in: torch.Tensor | None = None,
                  states_out: list | None = None) -> torch.Tensor:
    """One token's router logits with the router's input norm, learned scale and softcap (Gemma 4, Laguna), and its
    router network (Zaya; its state goes to ``states_out``)."""
    xr = x_D.float()
    norm = r.get("input_norm")
    if norm:
        if norm.get("kind", "rms") == "rms":
            xr = xr / torch.sqrt((xr * xr).mean() + norm.get("eps", 1e-6))
        if norm.get("weight"):
            xr = xr * layer.router.input_norm.weight
        xr = xr * norm.get("multiplier", 1.0)
    if r.get("mlp"):
        xr, state = router_network_token(r["mlp"], layer, xr, state_in)
        if states_out is not None:
            states_out.append(state)
    rb = getattr(layer.router, "bias", None)
    lg = layer.router.weight @ xr + (rb if rb is not None else 0)
    if r.get("learned_logit_scale"):
        lg = lg * layer.router.logit_scale[0]
    c = r.get("logit_softcap")
    return lg if c is None else c * torch.tanh(lg / c)


def expert_space_norm(v: torch.Tensor, norm: dict, weight: torch.Tensor) -> torch.Tensor:
    """One row of spec.ExpertNorm, written out: scale = offset + weight, applied before or after v / rms(v)."""
    scale = weight + norm.get("weight_offset", 0.0)
    if norm.get("scale", "after") == "before":
        v = v * scale
    v = v / torch.sqrt((v * v).mean() + norm.get("eps", 1e-6))
    return v if norm.get("scale", "after") == "before" else v * scale


def reference_forward(spec: dict, layer, x_TD: torch.Tensor, token_ids=None, expert_fn=None,
                      sequences: int = 1, combine=None, router_state=None, states_out=None) -> torch.Tensor:
    """y_TD for a [T, D] input; ``layer`` supplies parameters only. ``expert_fn`` (default ``expert``)
    computes one expert MLP, for references of other precisions (tests/test_fp8_layer.py). ``sequences``:
    the T tokens are that many sequences of equal length (a capacity counted per sequence). ``combine(routed,
    shared)``: how one token's shared output joins its routed output, written by the test for a spec with
    ``shared_experts.combine`` (default: their sum). ``router_state`` [T, H]: the previous layer's router state
    (router.mlp); the tokens' own states are appended to the list ``states_out``."""
    if combine is None:
        if spec["moe"].get("shared_experts", {}).get("combine", "routed + shared") != "routed + shared":
            raise ValueError("the spec combines shared and routed outputs its own way: pass combine=")
        combine = lambda routed, shared: routed + shared  # noqa: E731
    expert_fn = expert_fn or expert
    m = spec["moe"]
    r = m["router"]
    ex = m["experts"]
    E = ex["num_experts"]
    T, D = x_TD.shape
    gated = ACT[ex.get("activation", "swiglu")][1]
    up = layer.experts.gate_up_proj if gated else layer.experts.up_proj
    down = layer.experts.down_proj
    ub = getattr(layer.experts, ("gate_up_proj" if gated else "up_proj") + "_bias", None)
    db = getattr(layer.experts, "down_proj_bias", None)
    kw = dict(activation=ex.get("activation", "swiglu"), gate_clamp=ex.get("gate_clamp"), up_clamp=ex.get("up_clamp"))
    rtype = r.get("type", "topk")
    assignments: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(T)]
    shared_weights: list[list[torch.Tensor]] = [[] for _ in range(T)]
    if rtype == "hash":
        K = r.get("top_k", 1)
        for t in range(T):
            tid = int(token_ids[t])
            if r.get("method", "random") == "modulo":
                es = [(tid + k * (E // K)) % E for k in range(K)]
            else:
                es = [int(e) for e in layer.router.hash_table[tid]]
            if r.get("score") is None:
                assignments[t] = [(e, torch.tensor(1.0 / K)) for e in es]
                continue
            # Scored hash routing (DeepSeek-V4): the table picks, the router's scores weigh.
            rb = getattr(layer.router, "bias", None)
            s = score(r["score"], layer.router.weight @ x_TD[t].float() + (rb if rb is not None else 0))
            ws = [s[e] for e in es]
            if r.get("normalize"):
                tot = sum(ws) + 1e-20
                ws = [w / tot for w in ws]
            assignments[t] = [(e, w * r.get("scaling_factor", 1.0)) for e, w in zip(es, ws)]
    else:
        logits = [router_logits(r, layer, x_TD[t], None if router_state is None else router_state[t], states_out)
                  for t in range(T)]
        if rtype == "expert_choice":
            s = torch.stack([score(r.get("score", "softmax"), lg) for lg in logits]) if T else torch.zeros(0, E)
            C = min(T, math.ceil(r.get("capacity_factor", 2.0) * T / E))
            for e in range(E):
                col = [(float(s[t, e].detach()), t) for t in range(T)]
                for _, t in sorted(col, key=lambda p: -p[0])[:C]:
                    assignments[t].append((e, s[t, e]))
        else:
            bias = getattr(layer.router, "expert_bias", None)
            sh = m.get("shared_experts", {})
            routed_shared = sh.get("count", 0) if sh.get("gate") == "router" else 0
            for t in range(T):
                assignments[t] = route_token(spec, logits[t], bias, routed_shared)
                # Routed shared experts (Inkling): weights for shared expert s, kept apart from the routed ones.
                shared_weights[t] = [w for _, w in assignments[t][len(assignments[t]) - routed_shared:]]
                assignments[t] = assignments[t][:len(assignments[t]) - routed_shared]
                if r.get("per_expert_scale"):  # Gemma 4: one learned scale per expert on its weight
                    assignments[t] = [(e, w * layer.router.per_expert_scale[e]) for e, w in assignments[t]]
                if r.get("learned_weight_scale"):  # Inkling: one learned scalar on every weight, the shared ones too
                    s = layer.router.weight_scale[0]
                    assignments[t] = [(e, w * s) for e, w in assignments[t]]
                    shared_weights[t] = [w * s for w in shared_weights[t]]
            cap = r.get("capacity")
            if cap:
                K = r["top_k"]
                per_seq = cap.get("per", "batch") == "sequence"
                L = T // sequences if per_seq else T  # the tokens one capacity counts over
                capacity = cap.get("tokens") or max(cap.get("min_capacity", 1), math.ceil(cap["factor"] * L * K / E))
                pairs = [(t, k, e, w) for t in range(T) for k, (e, w) in enumerate(assignments[t])]
                keep = set()
                for e, s0 in [(e, s0) for e in range(E) for s0 in range(0, T, max(L, 1))]:
                    mine = [p for p in pairs if p[2] == e and s0 <= p[0] < s0 + L]
                    policy = cap.get("drop_policy", "probs")
                    if policy == "probs":
                        mine.sort(key=lambda p: -float(p[3].detach()))
                    elif policy == "choice_then_position":  # GShard: all first choices, then second ones
                        mine.sort(key=lambda p: (p[1], p[0]))
                    else:
                        mine.sort(key=lambda p: (p[0], p[1]))
                    keep |= {(p[0], p[1]) for p in mine[:capacity]}
                assignments = [[(e, w) for k, (e, w) in enumerate(assignments[t]) if (t, k) in keep] for t in range(T)]
    ys = []
    proj = m.get("expert_projection")  # Muse Spark: the experts work in a space of their own
    for t in range(T):
        xe = x_TD[t]
        if proj:
            xe = layer.pre_expert_proj.weight @ x_TD[t]
        if ex.get("input_norm"):  # Gemma 4, Muse Spark: the experts see a normalised input, the router the input
            xe = expert_space_norm(xe, ex["input_norm"], layer.pre_expert_norm.weight)
        y = torch.zeros(xe.shape[0], dtype=x_TD.dtype)
        on_input = ex.get("routing_weight", "output") == "input"  # Llama 4: expert(w * x)
        for e, w in assignments[t]:
            if e >= E:  # LongCat-Flash: identity experts return the input, zero experts nothing
                y = y + (w * x_TD[t] if e < E + ex.get("identity_experts", 0) else 0)
                continue
            args = (up[e], down[e], None if ub is None else ub[e], None if db is None else db[e])
            if on_input:
                y = y + expert_fn(w * xe, *args, **kw)
                continue
            out = expert_fn(xe, *args, **kw)
            on_e = ex.get("output_norm")
            if on_e:  # Muse Spark: each expert's output normalised before its weight; Ergo: a weight per expert
                out = expert_space_norm(out, on_e, layer.experts.output_norm_weight[e] if on_e.get("per_expert")
                                        else layer.expert_output_norm.weight)
            y = y + w * out
        if proj:
            y = layer.post_expert_proj.weight @ y
        sh = m.get("shared_experts", {})
        routed, y = y, torch.zeros(D, dtype=x_TD.dtype)  # y now collects the shared output
        if sh.get("gate") == "router":  # shared expert s weighted by its router weight, weights [count, ., .]
            sup = layer.shared_experts.gate_up_proj if gated else layer.shared_experts.up_proj
            sub = getattr(layer.shared_experts, ("gate_up_proj" if gated else "up_proj") + "_bias", None)
            sdb = getattr(layer.shared_experts, "down_proj_bias", None)
            for s_, w in enumerate(shared_weights[t]):
                y = y + w * expert_fn(x_TD[t], sup[s_], layer.shared_experts.down_proj[s_],
                                      None if sub is None else sub[s_], None if sdb is None else sdb[s_], **kw)
        elif sh.get("count", 0):
            sup = layer.shared_experts.gate_up_proj if gated else layer.shared_experts.up_proj
            sub = getattr(layer.shared_experts, ("gate_up_proj" if gated else "up_proj") + "_bias", None)
            sdb = getattr(layer.shared_experts, "down_proj_bias", None)
            out = expert_fn(x_TD[t], sup, layer.shared_experts.down_proj, sub, sdb, **kw)
            if sh.get("gate", "none") == "sigmoid":
                out = torch.sigmoid(layer.shared_expert_gate.weight[0] @ x_TD[t]) * out
            if sh.get("output_norm"):  # Ergo: the shared MLP's output normalised
                out = expert_space_norm(out, sh["output_norm"], layer.shared_expert_norm.weight)
            y = y + out
        y = combine(routed, y)
        on = m.get("output_norm")
        if on is not None:  # AXK1: RMS norm of the whole output, one token at a time
            y = layer.output_norm.weight * (y / torch.sqrt((y * y).mean() + on.get("eps", 1e-6)))
        if m.get("output_bias"):  # JetMoE: a learned bias on the output
            y = y + layer.output.bias
        ys.append(y)
    return torch.stack(ys) if ys else x_TD.new_zeros(0, D)
