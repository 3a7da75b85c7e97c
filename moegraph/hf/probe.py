"""Step 2-3: a light copy of the block routes random tokens; its experts are stubs that record inputs.

The recorded expert ids and weights feed ``routing.identify_routing``; the combine is checked here.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnsupportedBlock
from .anatomy import BlockAnatomy, _gate_constants, _named_tensors, get_path
from ..semantics.routing import router_input as _router_input
from ..semantics.routing import router_network
from .router_net import network_params
from .vocab import TOKEN_ID_ARGS


class _Recorder(nn.Module):
    """Stands in for experts / shared experts in the probe copy: records inputs, returns a known tensor."""

    def __init__(self, out_TD: Tensor, dense_out_ND: Tensor | None = None):
        super().__init__()
        self.out_TD = out_TD
        self.dense_out_ND = dense_out_ND  # returned when called on every (expert, token) row (Llama 4)
        self.calls: list[tuple[tuple, dict]] = []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        x = args[0] if args else next(iter(kwargs.values()))
        out = self.out_TD
        if self.dense_out_ND is not None and x.numel() == self.dense_out_ND.numel():
            out = self.dense_out_ND
        if x.numel() != out.numel():  # an unexpected call; the probe reports it afterwards
            return torch.zeros_like(x)
        # A copy: a block may add to what its experts return in place.
        return out.to(x.dtype, copy=True).reshape(*x.shape[:-1], out.shape[-1])


@dataclass
class Probe:
    """What the light copy of a block did on random tokens."""

    x_TD: Tensor
    logits_TE: Tensor
    expert_bias_E: Tensor | None
    ids_TK: Tensor
    weights_TK: Tensor
    output_kind: tuple[str, ...]  # ("tensor",) or ("tuple", kind of each extra element, ...)
    token_arg: str | None = None  # the forward argument carrying token ids (``input_ids``), if it takes one
    token_ids_T: Tensor | None = None  # the ids the probe passed in it
    uses_token_ids: bool = False  # whether the routing changed with the ids (two probes, other ids)
    token_table_VK: Tensor | None = None  # the (random) token id -> experts table of the probe copy
    input_scaled: bool = False  # the experts got every token scaled by its routing weight: expert(w * x)
    flat_output: bool = False  # a [B, S, D] input comes back as [B*S, D] (Llama 4)
    routed_scale: float = 1.0  # the block multiplies the routed experts' sum by this (Beam), shared ones not
    shared_weights_TS: Tensor | None = None  # weights the stacked shared experts received, one per (token, expert)
    capacity: tuple[int, str, str] | None = None  # (tokens, per, drop_policy) of a block that drops over-full experts
    #: positive constants the block holds outside its experts, by kind ("softcap", "jitter"): candidates for the
    #: router transforms routing identification tries (a logit softcap, a sparsemixer's eps)
    constants: dict[str, list[float]] = field(default_factory=dict)
    #: what the router's linear sees when it is not the block input: (kind, eps, weight name or None, multiplier),
    #: the spec's router.input_norm (Gemma 4: rms(x) * scale * hidden_size ** -0.5); None = the block input
    router_input: tuple[str, float, str | None, float] | None = None
    #: the anatomy with its two candidate norms resolved (which one the experts' input goes through); None = as given
    anatomy: BlockAnatomy | None = None
    flattened: bool = False  # the block returns its output (and router logits) flattened to 1-D (Ernie 4.5 VL)
    zero_from: int | None = None  # the first zero-expert router id, when the block has zero experts
    #: a block that handles its router choices beyond the E experts around them (LongCat since transformers 5.25:
    #: its experts receive them as weight-0 choices of an expert): per token, the multiple of its input it adds
    #: for them, the weight of its identity choices (``routing.read_extra_choices`` reads which choices are which)
    beside_T: Tensor | None = None
    #: the block's one-element learned tensor that multiplies every routing weight (Inkling's global_scale), the
    #: spec's router.weight_scale: probed at 1, so the weights above are those of the scale at one; None = none
    weight_scale: str | None = None


def light_copy(block: nn.Module, heavy: tuple[str, ...]) -> nn.Module:
    """A deep copy of ``block`` without its heavy children (replaced by empty placeholders)."""
    saved = {n: block._modules[n] for n in heavy}
    try:
        for n in heavy:
            block._modules[n] = nn.Identity()
        light = copy.deepcopy(block)
    finally:
        for n, m in saved.items():
            block._modules[n] = m
    return light


def probe_block(block: nn.Module, anat: BlockAnatomy, tokens: int = 48, seed: int = 0) -> Probe:
    """Route random tokens through a light float32 copy of ``block`` with random router weights.

    Works on meta-device blocks too (only the small router tensors are materialised). A learned scalar of the
    block is a routing-weight scale (``Probe.weight_scale``) when doubling it doubles every weight the experts
    and router-weighted shared experts receive and changes nothing else, on top-k routing (the spec's hash
    routers have no such scale); the routing is then read with it at one. Other scalars keep their values.
    """
    for name in _scalar_names(block, anat):
        at_one, doubled = (_probe(block, anat, tokens, seed, {name: v}) for v in (1.0, 2.0))
        if not at_one.uses_token_ids and _doubles_weights(at_one, doubled):
            return dataclasses.replace(at_one, weight_scale=name)
    return _probe(block, anat, tokens, seed, {})


def _scalar_names(mod: nn.Module, anat: BlockAnatomy) -> list[str]:
    """The one-element floating-point tensors of a block (or its light copy) outside its experts."""
    heavy = tuple(f"{n}." for n in (anat.experts_name, *anat.shared_names))
    return [n for n, t in _named_tensors(mod) if t.is_floating_point() and t.numel() == 1
            and n != anat.router_weight_name and not n.startswith(heavy)]


def _doubles_weights(a: Probe, b: Probe) -> bool:
    """Whether probe ``b`` is probe ``a`` with every routing weight (shared experts' included) doubled."""
    def doubled(x: Tensor | None, y: Tensor | None) -> bool:
        return (x is None) == (y is None) and (x is None or torch.allclose(y, 2 * x, rtol=1e-5, atol=1e-7))

    return (bool(a.weights_TK.abs().max() > 0) and torch.equal(a.ids_TK, b.ids_TK)
            and torch.allclose(a.logits_TE, b.logits_TE) and a.routed_scale == b.routed_scale
            and doubled(a.weights_TK, b.weights_TK) and doubled(a.shared_weights_TS, b.shared_weights_TS))


def _probe(block: nn.Module, anat: BlockAnatomy, tokens: int, seed: int, fills: dict[str, float]) -> Probe:
    """``probe_block`` with the one-element tensors named in ``fills`` at those values."""
    cls = anat.block_class
    D, E = anat.hidden_size, anat.num_experts
    # One more token per router choice beyond the experts, along its router row, so that each is chosen.
    aligned = anat.extra_choices if anat.router_network is None else 0
    tokens += aligned
    heavy = (anat.experts_name, *anat.shared_names)
    light = light_copy(block, heavy)
    constants = {word: _gate_constants(light, word) for word in ("softcap", "jitter", "eps")}  # experts left out
    g = torch.Generator().manual_seed(seed)
    # Learned scalars that multiply the routing keep their values (a meta block's are taken as 1), which the spec
    # then holds as constants, unless ``fills`` sets them (a routing-weight scale, probed at 1 and 2).
    tensors = dict(_named_tensors(light))
    scalars = {n: fills.get(n, 1.0 if tensors[n].is_meta else float(tensors[n].detach()))
               for n in _scalar_names(light, anat)}
    if any(t.is_meta for _, t in _named_tensors(light)):
        light = light.to_empty(device="cpu")
    light = light.float().eval()
    net_weights = {p for _, p in anat.router_network.params} if anat.router_network else set()
    with torch.no_grad():
        # Random routing parameters: ties become unlikely and every part of the routing shows.
        for name, t in _named_tensors(light):
            if not t.is_floating_point():
                continue
            if name in scalars:
                t.fill_(scalars[name])
            elif name == anat.router_weight_name or (name in net_weights and t.dim() == 2):
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t.shape[1]))
            elif name == anat.expert_bias_name or name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3 + 1.0)
        table = get_path(light, anat.token_table_name) if anat.token_table_name else None
        if table is not None:  # distinct random experts per token id, so that the table's use shows
            V, K = table.shape
            table.copy_(torch.rand(V, E, generator=g).argsort(-1)[:, :K])
        M = anat.expert_width or D  # the experts' width (their own space, when the block projects into it)
        routed_out = torch.randn(tokens, M, generator=g)
        shared_out = torch.randn(tokens, D, generator=g)
        dense_out = torch.randn(E * tokens, D, generator=g)
        x = torch.randn(1, tokens, D, generator=g)
        if aligned:  # (a logit of 6 for its choice, whose score then leads whatever the scoring)
            rows_ND = get_path(light, anat.router_weight_name)[E:E + aligned].float()
            x[0, -aligned:] = 6 * rows_ND / rows_ND.pow(2).sum(-1, keepdim=True)
        token_arg = token_id_arg(block)
        vocab = token_vocab(block)
        tid_T = torch.randint(0, vocab, (tokens,), generator=g)

        # An expert capacity in tokens (Switch Transformers' expert_capacity): lifted while the routing is read;
        # its rule is read afterwards, on a small capacity.
        caps = [(m, a) for m in light.modules() for a, v in vars(m).items()
                if a == "expert_capacity" and isinstance(v, int) and not isinstance(v, bool)]
        capacity_C = getattr(*caps[0]) if caps else None
        for m, a in caps:
            setattr(m, a, 1 << 30)

        sig_ND = torch.randn(E * tokens, D, generator=g)  # split layout: what each down-projected row returns

        seen = _watch_router_input(light, anat, tokens)

        def run(tid_1T: Tensor | None, x_in: Tensor = x) -> tuple[object, _Recorder, list[_Recorder]]:
            experts = _Recorder(routed_out, dense_out)
            light._modules[anat.experts_name] = experts
            if anat.split_down_name:  # up rows return zeros, down rows known signatures (_split_routing)
                H = anat.intermediate_size * (2 if anat.gated else 1)
                experts.forward = lambda *a, **k: (experts.calls.append((a, k)), a[0].new_zeros(a[0].shape[0], H))[1]
                light._modules[anat.split_down_name] = _RowSignatures(sig_ND)
            sharers = []
            for n in anat.shared_names:
                sharers.append(_Recorder(shared_out))
                light._modules[n] = sharers[-1]
            kwargs = {token_arg: tid_1T} if token_arg else {}
            return light(x_in, **kwargs), experts, sharers

        try:
            out, experts, sharers = run(tid_T.view(1, tokens) if token_arg else None)
            uses_ids = False
            if token_arg:
                # Evidence, not a guess: the routing uses the token ids iff other ids route otherwise.
                _, again, _ = run(((tid_T + 1 + torch.randint(0, vocab - 1, (tokens,), generator=g)) % vocab)
                                  .view(1, tokens))
                uses_ids = not _same_calls(experts, again)
        except NotImplementedError as exc:  # (JetMoE's mixture of attention: driven through map/reduce)
            raise UnsupportedBlock(f"it cannot be called: its forward raises NotImplementedError ({exc}); its model "
                                   "drives it through other methods, so there is no block call to replace", cls) from exc
        except Exception as exc:  # reported as the reason the block cannot be read
            extra = forward_args(block)
            hint = (f" (its forward also takes {', '.join(extra)}: routing that depends on more than the hidden "
                    "states, e.g. token-id hash routing, is not read)") if extra else ""
            raise UnsupportedBlock(f"probing its routing failed: {type(exc).__name__}: {exc}{hint}", cls) from exc
        w_r = get_path(light, anat.router_weight_name)
        b_r = get_path(light, anat.router_bias_name) if anat.router_bias_name else None
        router_input = None
        xr_TD = x.view(tokens, D)
        if seen and not torch.allclose(seen[0], xr_TD, rtol=1e-5, atol=1e-6):
            router_input, xr_TD = _read_router_input(light, anat, xr_TD, seen[0], constants)
        if router_input is None and b_r is None:
            # A constant the router multiplies its logits by (``output_multiplier``), a candidate of the routing
            # identification: for a bias-free router on the block input it is a multiplier on that input.
            constants["multiplier"] = _gate_constants(light, "multiplier")
        if anat.router_network is not None:  # a router that is a small network: its output feeds router.weight
            xr_TD, _ = router_network(xr_TD, list(anat.router_network.layers), network_params(light, anat.router_network))
        logits = F.linear(xr_TD, w_r.float(), None if b_r is None else b_r.float())
        eb = get_path(light, anat.expert_bias_name).reshape(-1).clone() if anat.expert_bias_name else None

    y = out[0] if isinstance(out, tuple) else out
    bias_D = get_path(light, anat.output_bias_name).detach().float() if anat.output_bias_name else 0.0
    if anat.split_down_name:
        ids, w, routed_split = _split_routing(experts, y, bias_D, x.view(tokens, D), sig_ND, anat)
    # The experts must have been called once with (tokens, ids [T, K], weights [T, K]).
    if not anat.split_down_name and len(experts.calls) != 1:
        raise UnsupportedBlock(f"its experts module was called {len(experts.calls)} times per forward; expected once "
                               "with (hidden_states, top_k_index, top_k_weights)", cls)
    args, kwargs = experts.calls[0]
    vals = list(args) + list(kwargs.values())
    input_scaled = len(vals) == 1 and isinstance(vals[0], Tensor) and vals[0].shape[0] == E * tokens
    if anat.split_down_name:
        input_scaled = False
    elif input_scaled:
        ids, w = _weights_from_scaled_inputs(vals[0], x.view(tokens, D), anat)
    elif len(vals) < 3 or not all(isinstance(v, Tensor) for v in vals[:3]):
        raise UnsupportedBlock(
            "its experts are not called as experts(hidden_states, top_k_index, top_k_weights)"
            + (f" (called with {len(vals)} argument(s))" if len(vals) < 3 else ""), cls,
        )
    kept = None
    if not input_scaled and not anat.split_down_name:
        h, ids, w = vals[:3]
        if ids.is_floating_point() and not w.is_floating_point():
            ids, w = w, ids
        if (E > 2 and ids.dim() == 2 and tuple(ids.shape) == (tokens, E) and not ids.is_floating_point()
                and bool(((ids == 0) | (ids == 1)).all())):
            raise UnsupportedBlock(
                f"its experts receive a [tokens, {E}] 0/1 mask where expert ids belong (NLLB-MoE's top-1 mask, "
                "with [tokens, E] weights), so an experts module that reads ids from it runs only experts 0 and 1; "
                "that is not the top-k routing its router computes, and the spec does not reproduce it", cls)
        mask = _from_dispatch_mask(ids, w, tokens, E)
        if mask is not None:  # a one-hot dispatch mask [T, K, E] (Switch Transformers)
            ids, w, kept = mask
            if not bool(kept.all()):
                raise UnsupportedBlock("its router drops tokens although the probe lifted its expert_capacity", cls)
    xe_TM = x.view(tokens, D)
    resolved = None
    if anat.norm_candidates and not input_scaled and not anat.split_down_name:
        anat = resolved = _resolve_norms(light, anat, xe_TM, h.reshape(-1, h.shape[-1]).float())
    if anat.expert_width or anat.pre_norm_name:  # what the experts should see: the projected, normalised input
        xe_TM = _expert_input(light, anat, xe_TM)
    if not input_scaled and not anat.split_down_name and (
            h.shape[-1] != M or h.numel() != tokens * M or not (
                torch.equal(h.reshape(tokens, M), xe_TM) if not (anat.expert_width or anat.pre_norm_name)
                else torch.allclose(h.reshape(tokens, M).float(), xe_TM, rtol=1e-5, atol=1e-6))):
        if anat.expert_width or anat.pre_norm_name:
            raise UnsupportedBlock(
                "the tokens its experts receive are not the block input"
                + (f" projected by {anat.pre_proj_name}" if anat.expert_width else "")
                + (f" and normalised by {anat.pre_norm_name}" if anat.pre_norm_name else "")
                + "; the spec's expert_projection and experts.input_norm do not describe what its experts see", cls)
        raise UnsupportedBlock(
            "the tokens its experts receive are not the block input (the block rescales or transforms them "
            "before the experts, e.g. by the router score); the spec applies routing weights to expert outputs", cls,
        )
    if ids.dim() != 2 or ids.shape[0] != tokens or w.shape != ids.shape:
        raise UnsupportedBlock(f"its experts receive routing of shape {tuple(ids.shape)}/{tuple(w.shape)}; expected "
                               f"[{tokens}, K] ids and weights", cls)

    # Router choices beyond the experts: the experts module handles them (it receives ids >= E), or the block does
    # around it, handing them over as weight-0 choices of some expert and adding w * x for each identity one.
    beside = False
    if anat.extra_choices and not input_scaled and not anat.split_down_name:
        if bool((ids >= E).any()):
            if anat.extra_unread:
                raise UnsupportedBlock(anat.extra_unread, cls)
        elif bool((w == 0).any()):
            beside = True
        elif anat.extra_unread:
            raise UnsupportedBlock(f"{anat.extra_unread}; nor did its experts receive weight-0 stand-ins for them in "
                                   "the probe (a block handling them itself)", cls)
    if beside and (anat.output_norm_name or anat.expert_width):
        raise UnsupportedBlock(f"it handles its {anat.extra_choices} router choices beyond the {E} experts itself, "
                               "around experts with " + ("an output norm" if anat.output_norm_name else
                                                         "their own projected space") + "; that is not read", cls)

    # The combine: output == c * routed + (sigmoid gate *) shared, with c = 1 unless the block scales the
    # routed output itself (Beam): c is read off the output and folded into the routing weights.
    routed = dense_out.view(E, tokens, D).sum(0) if input_scaled else routed_out
    if anat.split_down_name:
        routed = routed_split
    if anat.expert_width:  # the experts' weighted sum, projected back to the block's width
        with torch.no_grad():
            routed = F.linear(routed, get_path(light, anat.post_proj_name).weight.float())
    expect = torch.zeros(tokens, D) + bias_D
    if anat.shared_names:
        for s in sharers:
            if len(s.calls) != 1 or not torch.equal(s.calls[0][0][0].reshape(tokens, D), x.view(tokens, D)):
                raise UnsupportedBlock("its shared expert does not run once on the block input", cls)
        if anat.shared_routed:  # stacked shared experts weighted by router rows: the weights they received
            args, kw = sharers[0].calls[0]
            got = [v for v in list(args[1:]) + list(kw.values()) if isinstance(v, Tensor)
                   and v.numel() == tokens * anat.shared_routed]
            if len(got) != 1:
                raise UnsupportedBlock(f"its router has {anat.shared_routed} rows for its {anat.shared_routed} "
                                       "stacked shared experts, but the shared experts receive no weights from it", cls)
            shared_w = got[0].reshape(tokens, anat.shared_routed).float()
        scale = 1.0
        if anat.shared_gate_name:
            wg = get_path(light, anat.shared_gate_name).weight
            scale = torch.sigmoid(F.linear(x.view(tokens, D), wg))
        expect = expect + scale * shared_out
    if isinstance(y, Tensor) and y.numel() == tokens * D and y.shape[-1] != D and y.dim() != 1:
        raise UnsupportedBlock(f"it returns its output flattened (shape {tuple(y.shape)} for {tokens} tokens of {D}); "
                               "the compiled layer returns [..., hidden] like its input", cls)
    beside_T = None
    if beside and isinstance(y, Tensor) and y.numel() == tokens * D:
        # What the block adds beside its experts: a multiple of each token's input (checked with the rest below).
        with torch.no_grad():  # (``expect`` may carry a shared-expert gate's autograd history)
            beside_T = _beside_multiples(y.reshape(tokens, D).float() - expect, routed, x.view(tokens, D))
        expect = expect + beside_T.unsqueeze(-1) * x.view(tokens, D)
    routed_scale = 1.0
    if anat.output_norm_name:  # the spec's RMS norm of routed + shared (no routed scale can be read through it)
        expect = expect + routed
        routed = torch.zeros_like(routed)
        with torch.no_grad():
            wn = get_path(light, anat.output_norm_name).weight.float()
        expect = wn * (expect * torch.rsqrt(expect.pow(2).mean(-1, keepdim=True) + anat.output_norm_eps))
    elif isinstance(y, Tensor) and y.numel() == tokens * D and not input_scaled:
        with torch.no_grad():  # (a shared-expert gate's weight makes ``expect`` carry autograd history)
            c = float(((y.reshape(tokens, D).float() - expect) * routed).sum() / (routed * routed).sum())
        routed_scale = 1.0 if math.isclose(c, 1.0, rel_tol=1e-5) else float(f"{c:.6g}")
    expect = expect + routed_scale * routed
    if not isinstance(y, Tensor) or y.numel() != tokens * D or not routed_scale > 0 or not torch.allclose(
        y.reshape(tokens, D), expect, rtol=1e-5, atol=1e-6
    ):
        extra = f" (parameters not accounted for: {', '.join(anat.unexplained)})" if anat.unexplained else ""
        raise UnsupportedBlock(
            "its output is not routed experts + shared experts" + (" x sigmoid gate" if anat.shared_gate_name else "")
            + f"; it transforms or adds to them in a way the spec cannot express{extra}", cls,
        )
    capacity = None
    if capacity_C is not None:
        capacity = _capacity_rule(run, caps, x, ids.long(), w.float(), E, capacity_C, cls)
    kind: tuple[str, ...] = ("tensor",)
    if isinstance(out, tuple):
        extras = []
        for e in out[1:]:
            if isinstance(e, Tensor) and (e.shape == logits.shape or y.dim() == 1 and e.shape == (logits.numel(),)) \
                    and torch.allclose(e.float().reshape(logits.shape), logits, atol=1e-5):
                extras.append("router_logits")  # (flattened as the output is, Ernie 4.5 VL)
            elif anat.router_network is not None and anat.router_network.state_returned and isinstance(e, Tensor) \
                    and e.dim() == 3 and "router_state" not in extras:
                extras.append("router_state")  # (which value it is, the router network's reading checked)
            else:
                extras.append("unknown")
        kind = ("tuple", *extras)
    return Probe(x.view(tokens, D), logits, eb, ids.long(), w.float(), kind, token_arg,
                 tid_T if token_arg else None, uses_ids, None if table is None else table.clone(), input_scaled,
                 y.dim() == 2, routed_scale, shared_w if anat.shared_routed else None, capacity, constants,
                 router_input, resolved, y.dim() == 1,
                 E if beside else anat.num_experts + anat.identity_experts if anat.zero_experts else None, beside_T)


def _beside_multiples(d_TD: Tensor, routed_TD: Tensor, x_TD: Tensor) -> Tensor:
    """[T] s with d == c * routed + s * x (one c for all tokens, by least squares): what a block adds beside its
    experts' weighted sum ``routed``, as a multiple of each token's input ``x``."""
    u_TD = x_TD / x_TD.norm(dim=-1, keepdim=True)

    def off_x(v_TD: Tensor) -> Tensor:
        return v_TD - (v_TD * u_TD).sum(-1, keepdim=True) * u_TD

    pr_TD = off_x(routed_TD)
    c = (pr_TD * off_x(d_TD)).sum() / (pr_TD * pr_TD).sum()
    return ((d_TD - c * routed_TD) * x_TD).sum(-1) / (x_TD * x_TD).sum(-1)


def _resolve_norms(light: nn.Module, anat: BlockAnatomy, x_TD: Tensor, h_TD: Tensor) -> BlockAnatomy:
    """The anatomy of a block with two [D] norms beside its experts (Gemma 4's MoE half): the one whose form
    (``anatomy.norm_form``) maps the block input to what the experts received is their input norm
    (experts.input_norm), the other the block's output norm. Unresolved: the first is the output norm, as for
    a block with one (the probe's checks then say what does not fit)."""
    from ..semantics.torch_forms import rms_norm
    from .anatomy import norm_form

    for i, (name, eps) in enumerate(anat.norm_candidates):
        (other, other_eps) = anat.norm_candidates[1 - i]
        mod = get_path(light, name)
        try:
            form = norm_form(mod, x_TD.shape[-1], eps, "norm beside the experts", anat.block_class)
        except UnsupportedBlock:
            continue
        with torch.no_grad():
            want = rms_norm(x_TD, eps, mod.weight.float(), form["weight_offset"], form["scale"] == "before")
        if h_TD.shape == want.shape and torch.allclose(h_TD, want, rtol=1e-5, atol=1e-6):
            return dataclasses.replace(anat, pre_norm_name=name, pre_norm=form, output_norm_name=other,
                                       output_norm_eps=other_eps, norm_candidates=())
    name, eps = anat.norm_candidates[0]
    return dataclasses.replace(anat, output_norm_name=name, output_norm_eps=eps, norm_candidates=())


def _expert_input(light: nn.Module, anat: BlockAnatomy, x_TD: Tensor) -> Tensor:
    """[T, M] what the spec gives the experts: x projected (expert_projection), then its norm (experts.input_norm)."""
    from ..semantics.torch_forms import rms_norm

    with torch.no_grad():
        xe_TM = F.linear(x_TD, get_path(light, anat.pre_proj_name).weight.float()) if anat.expert_width else x_TD
        if anat.pre_norm_name:
            n = anat.pre_norm
            xe_TM = rms_norm(xe_TM, n["eps"], get_path(light, anat.pre_norm_name).weight.float(), n["weight_offset"],
                             n["scale"] == "before")
    return xe_TM


class _RowSignatures(nn.Module):
    """Stands in for a split layout's down projections: row r of its output is ``sig_ND[r]``."""

    def __init__(self, sig_ND: Tensor):
        super().__init__()
        self.sig_ND = sig_ND

    def forward(self, rows: Tensor, *args, **kwargs) -> Tensor:
        return self.sig_ND[: rows.shape[0]].to(rows.dtype).clone()


def _split_routing(up: _Recorder, y: Tensor, bias_D: Tensor | float, x_TD: Tensor, sig_ND: Tensor,
                   anat: BlockAnatomy) -> tuple[Tensor, Tensor, Tensor]:
    """(ids_TK, weights_TK, routed_TD) of a block whose experts are two modules called on rows sorted by expert
    with the count per expert (JetMoE): each row's token is the input row it equals, its expert follows from
    the counts, and its weight is solved from the output, where down-projected row r returned ``sig_ND[r]``."""
    cls, E = anat.block_class, anat.num_experts
    T = x_TD.shape[0]
    if len(up.calls) != 1:
        raise UnsupportedBlock(f"its up projections were called {len(up.calls)} times per forward; expected once", cls)
    args, kwargs = up.calls[0]
    vals = list(args) + list(kwargs.values())
    rows = vals[0].reshape(-1, x_TD.shape[1]).float() if vals and isinstance(vals[0], Tensor) else None
    sizes = vals[1] if len(vals) > 1 else None
    sizes = sizes.tolist() if isinstance(sizes, Tensor) else sizes
    if rows is None or not isinstance(sizes, (list, tuple)) or len(sizes) != E or sum(sizes) != rows.shape[0]:
        raise UnsupportedBlock("its up projections are not called as (rows sorted by expert, rows per expert)", cls)
    same = (rows[:, None, :] == x_TD[None]).all(-1)  # [N, T]
    if not bool((same.sum(-1) == 1).all()):
        raise UnsupportedBlock("the rows its experts receive are not tokens of the block input", cls)
    tok_N = same.float().argmax(-1)
    exp_N = torch.repeat_interleave(torch.arange(E), torch.tensor(sizes))
    per_T = torch.bincount(tok_N, minlength=T)
    K = int(per_T.max())
    if not bool((per_T == K).all()):
        raise UnsupportedBlock("its tokens choose different numbers of experts", cls)
    order = torch.argsort(tok_N * E + exp_N)  # token-major, experts ascending within a token
    sig = sig_ND[: rows.shape[0]].double()[order].view(T, K, -1)
    target = (y.reshape(T, -1).double() - torch.as_tensor(bias_D, dtype=torch.float64)).unsqueeze(-1)
    w_TK = torch.linalg.lstsq(sig.transpose(1, 2), target).solution.squeeze(-1)
    routed = (sig * w_TK.unsqueeze(-1)).sum(1)
    return exp_N[order].view(T, K), w_TK.float(), routed.float()


def _from_dispatch_mask(ids: Tensor, w: Tensor, tokens: int, E: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """(ids_TK, weights_TK, kept_TK) of experts called with a one-hot dispatch mask [T, K, E] and weights [T, K]
    (Switch Transformers; a row of zeros: an assignment dropped by the capacity); None for other arguments."""
    if ids.dim() != 3 or ids.is_floating_point() or ids.shape[-1] != E or ids.numel() % (tokens * E):
        return None
    K = ids.numel() // (tokens * E)
    m = ids.reshape(tokens, K, E)
    if not bool(((m == 0) | (m == 1)).all()) or bool((m.sum(-1) > 1).any()) or w.numel() != tokens * K:
        return None
    return m.argmax(-1), w.reshape(tokens, K), m.sum(-1) == 1


def _capacity_rule(run, caps, x: Tensor, ids_TK: Tensor, w_TK: Tensor, E: int, C: int, cls: str
                   ) -> tuple[int, str, str]:
    """(tokens, per, drop_policy) of a block with an expert capacity of C tokens, the rule read by running it
    with a capacity of 2 on two sequences and comparing the assignments it keeps with each rule the spec has."""
    from ..runtime import apply_capacity

    if C <= 0:
        raise UnsupportedBlock(f"its expert_capacity is {C}; a capacity is a positive number of tokens", cls)
    T = ids_TK.shape[0]
    for m, a in caps:
        setattr(m, a, 2)
    try:
        with torch.no_grad():
            _, rec, _ = run(None, x.reshape(2, T // 2, x.shape[-1]))
    finally:
        for m, a in caps:
            setattr(m, a, 1 << 30)
    args, kwargs = rec.calls[0] if len(rec.calls) == 1 else ((), {})
    vals = [v for v in list(args) + list(kwargs.values()) if isinstance(v, Tensor)]
    got = _from_dispatch_mask(vals[1], vals[2], T, E) if len(vals) >= 3 else None
    if got is None:
        raise UnsupportedBlock("it has an expert_capacity, but its experts do not receive a dispatch mask to read "
                               "the dropped tokens from", cls)
    kept = got[2]
    for per in ("sequence", "batch"):
        for policy in ("position", "probs", "choice_then_position"):
            ours = apply_capacity(ids_TK, w_TK, E, None, 1, policy, tokens=2,
                                  sequences=2 if per == "sequence" else 1)
            if torch.equal(ours < E, kept):
                return C, per, policy
    raise UnsupportedBlock(f"it drops tokens beyond an expert_capacity of {C} by a rule the spec does not have "
                           "(neither the earliest nor the highest-weight ones, nor first choices first, per sequence "
                           "or per batch)", cls)


def _watch_router_input(light: nn.Module, anat: BlockAnatomy, tokens: int) -> list[Tensor]:
    """A list that receives what the module holding the router weight is called with (its first [tokens, D]
    tensor argument), once the block runs; it stays empty when the block uses the weight without calling it."""
    seen: list[Tensor] = []
    if "." not in anat.router_weight_name:
        return seen
    owner = get_path(light, anat.router_weight_name.rsplit(".", 1)[0])
    D = anat.hidden_size

    def hook(_mod: nn.Module, args: tuple) -> None:
        t = next((a for a in args if isinstance(a, Tensor)), None)
        if t is not None and t.shape[-1] == D and t.numel() == tokens * D and not seen:
            seen.append(t.detach().reshape(tokens, D).float().clone())

    owner.register_forward_pre_hook(hook)
    return seen


def _read_router_input(light: nn.Module, anat: BlockAnatomy, x_TD: Tensor, seen_TD: Tensor,
                       constants: dict[str, list[float]]) -> tuple[tuple[str, float, str | None, float], Tensor]:
    """The spec's router.input_norm that turns the block input ``x_TD`` into what the router linear saw: an RMS
    norm (eps from the block's constants) or none, times one of the block's unexplained [D] tensors or nothing,
    times a constant fitted here. Returns it and the router input it gives (UnsupportedBlock if none fits)."""
    D = anat.hidden_size
    weights: list[str | None] = [None] + [n for n in anat.unexplained if tuple(get_path(light, n).shape) == (D,)]
    eps_list = constants.get("eps") or [1e-6]
    tried = []
    for kind, eps in [("rms", e) for e in eps_list] + [("none", 0.0)]:
        for wname in weights:
            w_D = get_path(light, wname).detach().float() if wname else None
            base_TD = _router_input(x_TD, kind, eps, w_D, 1.0)
            c = float((seen_TD * base_TD).sum() / (base_TD * base_TD).sum())
            tried.append(f"{kind}{' x ' + wname if wname else ''}")
            if not c > 0 or not torch.allclose(seen_TD, c * base_TD, rtol=1e-5, atol=1e-6):
                continue
            c = next((v for v in (1.0, D ** -0.5, D ** 0.5) if math.isclose(c, v, rel_tol=1e-5)), float(f"{c:.7g}"))
            return (kind, eps if kind == "rms" else 1e-6, wname, c), _router_input(x_TD, kind, eps, w_D, c)
    raise UnsupportedBlock(
        "its router sees a transform of the block input that the spec's router.input_norm (an RMS norm or none, "
        f"times a [D] weight and a constant) does not reproduce; tried {', '.join(tried)}", anat.block_class)


def _weights_from_scaled_inputs(rows_ND: Tensor, x_TD: Tensor, anat: BlockAnatomy) -> tuple[Tensor, Tensor]:
    """(ids_TK, weights_TK) of a block that feeds every expert every token scaled by its routing weight
    (Llama 4: row e*T + t is w[t, e] * x[t], zero for experts not chosen); the spec's routing_weight: input.

    Summing expert(w * x) over all experts equals the sum over the chosen ones only if an expert maps 0
    to 0, so expert biases are refused.
    """
    cls = anat.block_class
    E, (T, D) = anat.num_experts, x_TD.shape
    r_ETD = rows_ND.reshape(E, T, D).float()
    w_ET = (r_ETD * x_TD).sum(-1) / (x_TD * x_TD).sum(-1)
    if not torch.allclose(r_ETD, w_ET.unsqueeze(-1) * x_TD, rtol=1e-5, atol=1e-6):
        raise UnsupportedBlock("it feeds every expert every token, transformed otherwise than scaled by one weight "
                               "per (expert, token)", cls)
    chosen_ET = w_ET != 0
    K = int(chosen_ET.sum(0).max())
    if K == 0 or not bool((chosen_ET.sum(0) == K).all()):
        raise UnsupportedBlock("it feeds every expert every token scaled by its routing weight, but tokens choose "
                               "different numbers of experts", cls)
    if anat.expert_bias_terms:
        raise UnsupportedBlock("it feeds every expert every token scaled by its routing weight (zero where not "
                               "chosen), and its experts have biases, so unchosen experts still add to the output", cls)
    ids_TK = chosen_ET.t().float().topk(K, dim=-1).indices
    return ids_TK, w_ET.t().gather(1, ids_TK)


def token_id_arg(block: nn.Module) -> str | None:
    """The block's forward argument that carries token ids (``input_ids``), if it has one."""
    return next((a for a in forward_args(block) if a in TOKEN_ID_ARGS), None)


def token_vocab(block: nn.Module) -> int:
    """How many token ids the probe may draw from: the model config's vocabulary, else 64."""
    for _, t in _named_tensors(block):
        if t.dim() == 2 and not t.is_floating_point() and t.dtype != torch.bool:  # a token table: its rows
            return t.shape[0]
    for m in (block, *block.modules()):
        v = getattr(getattr(m, "config", None), "vocab_size", None)
        if isinstance(v, int) and v > 1:
            return v
    return 64


def _same_calls(a: _Recorder, b: _Recorder) -> bool:
    if len(a.calls) != len(b.calls):
        return False
    for (args_a, kw_a), (args_b, kw_b) in zip(a.calls, b.calls):
        va, vb = list(args_a) + list(kw_a.values()), list(args_b) + list(kw_b.values())
        if len(va) != len(vb) or not all(
            torch.equal(p, q) if isinstance(p, Tensor) and isinstance(q, Tensor) else p == q for p, q in zip(va, vb)
        ):
            return False
    return True


def forward_args(block: nn.Module) -> list[str]:
    """The names of the arguments of ``block.forward`` after the hidden states."""
    import inspect

    try:
        params = list(inspect.signature(block.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
