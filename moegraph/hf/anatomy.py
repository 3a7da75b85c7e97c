"""Step 1: anatomy of a block, read from its modules (experts, router, biases, shared experts)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import UnsupportedBlock
from .router_net import RouterNetwork, read_router_network
from .vocab import _ACT_FNS, _SHARED_NAMES, GATED_ACT


@dataclass
class BlockAnatomy:
    """What a block is made of, found from its modules. Tensors are the block's own (not copies).

    Legend: E experts, D hidden, F expert hidden, S shared hidden (all shared experts together).
    """

    block_class: str
    experts_name: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    gated: bool
    transposed: bool  # expert weights stored [E, in, out] instead of [E, out, in]
    interleaved: bool  # gated rows stored gate0, up0, gate1, ... instead of all gate then all up
    expert_bias_terms: bool  # the routed expert projections carry biases
    activation_fn: str | None  # elementwise function of the experts (silu, gelu, ...), or an inline expression of
    # gate and up read from a custom _apply_gate (the spec's activation as is); None = not found
    router_weight_name: str  # dotted path inside the block of the [E, D] router weight
    router_bias_name: str | None
    expert_bias_name: str | None  # E-sized selection bias (e_score_correction_bias, expert_bias)
    shared_names: tuple[str, ...] = ()
    shared_layout: str | None = None  # "gate_up_down", "fused_gate_up", "up_down"; "stacked": [n, F, D] tensors
    shared_intermediate: int = 0
    shared_count: int = 0  # shared experts stored one by one ("stacked"); 0 = one MLP
    shared_routed: int = 0  # router rows after the routed choices that weigh the stacked shared experts (Inkling)
    shared_bias_terms: bool = False
    shared_activation_fn: str | None = None
    shared_gate_name: str | None = None
    shared_norm_name: str | None = None  # a norm of the shared expert's output inside it (Ergo's shared_experts.norm)
    shared_norm: dict[str, Any] | None = None  # its spec ExpertNorm
    unexplained: tuple[str, ...] = ()  # parameters/buffers none of the above accounts for
    token_table_name: str | None = None  # a [vocab, K] integer token id -> experts table (hash routing)
    expert_layout: str = "3d"  # "3d": transformers v5 [E, ., .] tensors; "flat_glu": DBRX's mlp.w1/v1/w2 [E*F, D];
    # "listed": a ModuleDict/ModuleList of E small MLPs (Switch Transformers)
    identity_experts: int = 0  # router choices after the E MLP experts whose expert returns its input (LongCat)
    zero_experts: int = 0  # ... and then those returning zero
    extra_choices: int = 0  # router choices after the E MLP experts (identity + zero experts, once read)
    #: why the experts module cannot say what those choices are (it fails on them, or is on the meta device): a
    #: block that handles them around its experts (LongCat since transformers 5.25) is read by the probe instead
    extra_unread: str | None = None
    gate_clamp: float | None = None  # clamps of a clamped gated activation (a custom _apply_gate)
    up_clamp: float | None = None
    output_norm_name: str | None = None  # a child RMS norm of the block output (AXK1's post_mlp_layernorm)
    split_down_name: str | None = None  # "split" layout: the child holding the down projections [E, D, F] (JetMoE)
    output_bias_name: str | None = None  # a [D] bias the block adds to its output (JetMoE's ``bias``)
    output_norm_eps: float | None = None
    # The experts' own space (Muse Spark): Linear children projecting D -> M before the experts and M -> D after
    # them (hidden_size is then the block's D), a norm of what the experts see (projected or not: Gemma 4 too),
    # and a norm on each expert's output inside the experts.
    expert_width: int | None = None  # M, when the experts are projected; None = they see the block input
    pre_proj_name: str | None = None
    post_proj_name: str | None = None
    pre_norm_name: str | None = None
    pre_norm: dict[str, Any] | None = None  # the spec's ExpertNorm of the experts' input (eps, weight_offset, scale)
    expert_norm_name: str | None = None  # path inside the block of the experts' per-expert output norm
    expert_norm: dict[str, Any] | None = None  # its spec ExpertNorm
    #: two [D] norms beside the experts (Gemma 4's MoE half): one normalises the experts' input, the other the
    #: block output; which is which, the probe reads from what the experts receive
    norm_candidates: tuple[tuple[str, float], ...] = ()
    # Set once the probe has read the routing (``block.read_block``):
    expert_scale_name: str | None = None  # the E-sized tensor scales the chosen experts' weights (router.per_expert_scale)
    router_input_weight_name: str | None = None  # a [D] weight on the router's input (router.input_norm.weight)
    weight_scale_name: str | None = None  # a learned scalar on every routing weight (router.weight_scale)
    router_network: RouterNetwork | None = None  # a router that is a small network (router.mlp); router_weight_name
    # is then its last Linear's weight
    notes: list[str] = field(default_factory=list)


def get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _named_tensors(mod: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from mod.named_parameters(remove_duplicate=False)
    yield from mod.named_buffers(remove_duplicate=False)


def probe_activation(fn: Any) -> str | None:
    """The spec name of an elementwise activation module/function, found numerically."""
    if fn is None:
        return None
    x = torch.linspace(-5, 5, 201, dtype=torch.float32)
    try:
        y = fn(x)
    except Exception:  # noqa: BLE001 - an activation we cannot even call is simply unknown
        return None
    if not isinstance(y, Tensor) or y.shape != x.shape:
        return None
    for name, ref in _ACT_FNS.items():
        if torch.allclose(y.float(), ref(x), rtol=1e-5, atol=1e-6):
            return name
    return None


def _gate_constants(module: nn.Module, word: str) -> list[float]:
    """Positive finite numbers held by a module or its submodules under an attribute whose name contains
    ``word`` ("limit", "alpha", "softcap", "jitter"): candidate constants of the experts' gate function, or
    of a block's router transforms (an infinite limit clamps nothing)."""
    out = []
    for mod in module.modules():
        for a, v in sorted(vars(mod).items()):
            if word in a.lower() and isinstance(v, (int, float)) and not isinstance(v, bool) \
                    and 0 < v < float("inf") and float(v) not in out:
                out.append(float(v))
    return out


def _fitted_alpha(gate_fn: Any, Fh: int, interleaved: bool, limit: float | None) -> float | None:
    """alpha such that the gate function is gate * sigmoid(alpha * gate) where up = 0 (found numerically;
    None if no single alpha explains it). Rounded to 6 significant digits, as such constants are written."""
    g_R = torch.linspace(0.25, min(limit or 2.0, 2.0) * 0.9, Fh, dtype=torch.float64)
    ours = torch.cat([g_R, torch.zeros(Fh, dtype=torch.float64)]).view(1, -1)
    try:
        with torch.no_grad():
            out = gate_fn(torch.stack([ours[0, :Fh], ours[0, Fh:]], 1).reshape(1, -1) if interleaved else ours)
    except Exception:  # noqa: BLE001 - the candidate is then simply not fitted
        return None
    if not isinstance(out, Tensor) or out.shape != (1, Fh):
        return None
    ratio = (out[0].double() / g_R).clamp(1e-6, 1 - 1e-6)
    alpha = torch.logit(ratio) / g_R
    if not torch.isfinite(alpha).all() or float(alpha.max() - alpha.min()) > 1e-3 * max(1.0, float(alpha.abs().max())):
        return None
    return float(f"{float(alpha.median()):.6g}")


def _gate_candidates(limits: list[float], alphas: list[float], softcaps: list[float]) -> list[str]:
    """Inline gate expressions the importer tries, simplest first, from the constants found: a function of
    the (clamped) gate times the (clamped or softcapped, optionally shifted) up. The function is a gated
    table activation, or a (softcapped) linear gate times sigmoid(alpha * gate), the clamp before or after."""
    def caps(v: str) -> list[str]:
        return [v] + [f"{c!r} * tanh({v} / {c!r})" for c in softcaps]

    out = []
    for L in [None, *limits]:
        G = "gate" if L is None else f"clamp(gate, max={L!r})"
        U = "up" if L is None else f"clamp(up, {-L!r}, {L!r})"
        fns = [f"{fn}({G})" for fn in GATED_ACT]
        fns += [f"{lin} * sigmoid({a!r} * {G})" for a in [1.0, *alphas] for lin in caps(G)]
        if L is not None:  # clamp after the function (Step-3.7)
            fns += [f"clamp({fn}(gate), max={L!r})" for fn in GATED_ACT]
        for f in fns:
            for u in caps(U):
                out += [f"{f} * {u}", f"({u} + 1) * {f}"]
    return out


def _read_gate_function(experts: nn.Module, interleaved: bool, cls: str) -> tuple[str, tuple[float | None, float | None]]:
    """Express an experts module's own ``_apply_gate`` in the spec, found numerically: a table entry with
    optional clamps (``gate_clamp``/``up_clamp``), else an inline expression of gate and up built from the
    constants the module holds (``limit``, ``alpha``, ...) or fits (alpha), each checked against the
    module's own function on probe inputs. Returns (activation, (gate_clamp, up_clamp))."""
    from ..ops import apply_activation

    limits = _gate_constants(experts, "limit")
    limit = limits[0] if limits else None
    Fh = 16
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 2 * Fh, generator=g) * (1.5 * limit if limit else 3.0)

    def gate_fn(t: Tensor) -> Tensor:
        return type(experts)._apply_gate(experts, t.clone())

    try:
        with torch.no_grad():
            ref = gate_fn(h)
    except Exception as exc:  # reported as the reason
        raise UnsupportedBlock(f"its experts' custom gate function {type(experts).__name__}._apply_gate could not be "
                               f"evaluated ({type(exc).__name__}: {exc})", cls) from exc
    # Our layout: all gate columns, then all up columns.
    ours = torch.cat([h[:, 0::2], h[:, 1::2]], 1) if interleaved else h

    def matches(act: str, gc: float | None, uc: float | None) -> bool:
        try:
            ours_out = apply_activation(ours, act, True, gc, uc)
        except ValueError:  # a candidate the expression language refuses (too long, ...) is no match
            return False
        return isinstance(ref, Tensor) and ref.shape == (64, Fh) and torch.allclose(ref, ours_out, rtol=1e-5, atol=1e-6)

    clamp_options = [(None, None)] + ([(limit, limit), (limit, None), (None, limit)] if limit else [])
    for act in GATED_ACT:  # the gated entries of the activation table
        for gc, uc in clamp_options:
            if matches(act, gc, uc):
                return act, (gc, uc)
    alphas = _gate_constants(experts, "alpha")
    fitted = _fitted_alpha(gate_fn, Fh, interleaved, limit)
    alphas += [fitted] if fitted is not None and fitted not in alphas else []
    for expression in _gate_candidates(limits, alphas, _gate_constants(experts, "softcap")):
        if matches(expression, None, None):
            return expression, (None, None)
    attrs = ", ".join(f"{a}={getattr(experts, a)}" for a in ("limit", "swiglu_limit", "alpha", "swiglu_alpha")
                      if getattr(experts, a, None) is not None)
    raise UnsupportedBlock(
        f"its experts use a custom gate function {type(experts).__name__}._apply_gate"
        + (f" ({attrs})" if attrs else "")
        + " that is none of the forms the importer tries: f(gate) * up or f(gate) * (up + 1), f a gated table "
        "activation or gate * sigmoid(alpha * gate), with optional clamps and softcaps from the module's "
        "limit/softcap; write the spec's activation as an expression of gate and up by hand", cls,
    )


def split_experts(block: nn.Module) -> tuple[str, str] | None:
    """(up child, down child) of experts kept as two modules each holding one 3-D ``weight`` [E, out, in]: the up
    projections [E, H, D] (H = 2F gated, gate rows first, or F) and the down ones [E, D, F] (JetMoE's
    input_linear / output_linear); None for any other layout."""
    three = {n: c.weight for n, c in block.named_children()
             if isinstance(getattr(c, "weight", None), Tensor) and c.weight.dim() == 3 and len(list(c.parameters())) == 1}
    for up, wu in three.items():
        for down, wd in three.items():
            E, H, D = wu.shape
            if up != down and wd.shape[0] == E and wd.shape[1] == D and H in (wd.shape[2], 2 * wd.shape[2]):
                return up, down
    return None


def _experts_child(block: nn.Module) -> tuple[str, nn.Module] | None:
    split = split_experts(block)
    if split is not None:
        return split[0], getattr(block, split[0])
    for name, child in block.named_children():
        for w in ("gate_up_proj", "up_proj"):
            p = getattr(child, w, None)
            if isinstance(p, Tensor) and p.dim() == 3 and isinstance(getattr(child, "down_proj", None), Tensor):
                return name, child
        if flat_glu(child) is not None or "expert" in name.lower() and listed_mlps(child) is not None:
            return name, child
    return None


@dataclass(frozen=True)
class ListedMLPs:
    """Experts kept as a ModuleDict / ModuleList of E small MLPs (Switch Transformers, NLLB-MoE): the names of
    each expert's Linear layers, found from their shapes (up: D -> F, down: F -> D; gated: gate and up)."""

    experts: tuple[nn.Module, ...]
    ups: tuple[str, ...]  # ("up",) or ("gate", "up") names, in the spec's order (gate rows first)
    down: str
    act: str | None


def listed_mlps(experts: nn.Module) -> ListedMLPs | None:
    """The experts of a module that lists E alike MLPs, each two Linear layers D -> F -> D (the first one
    defined is the up projection) or three named gate*/up*/down*; None for anything else."""
    if not isinstance(experts, (nn.ModuleDict, nn.ModuleList)) or type(experts).forward is nn.Module.forward:
        return None  # (a plain list, called expert by expert by its block, is the structural reader's: hf.structural)
    # (other entries, such as NLLB-MoE's token dropout, hold no Linear layer)
    mods = tuple(m for m in experts.children() if any(isinstance(c, nn.Linear) for c in m.children()))
    if len(mods) < 2:
        return None
    lins = [(n, m) for n, m in mods[0].named_children() if isinstance(m, nn.Linear)]
    if len(lins) == 2 and lins[0][1].out_features == lins[1][1].in_features \
            and lins[0][1].in_features == lins[1][1].out_features:
        ups, down = (lins[0][0],), lins[1][0]
    elif len(lins) == 3:
        by = {w: [n for n, _ in lins if w in n.lower()] for w in ("gate", "up", "down")}
        if any(len(v) != 1 for v in by.values()):
            return None
        ups, down = (by["gate"][0], by["up"][0]), by["down"][0]
    else:
        return None
    shapes = [tuple(getattr(mods[0], n).weight.shape) for n in (*ups, down)]
    for m in mods:  # every expert alike
        if [tuple(getattr(getattr(m, n, None), "weight", torch.empty(0)).shape) for n in (*ups, down)] != shapes:
            return None
    fn = next((getattr(mods[0], a) for a in ("act", "act_fn", "activation_fn", "activation")
               if getattr(mods[0], a, None) is not None), None)
    return ListedMLPs(mods, ups, down, probe_activation(fn))


def flat_glu(experts: nn.Module) -> tuple[Tensor, Tensor, Tensor, int, int] | None:
    """(w1, v1, w2, E, F) of experts stored as DBRX does: ``mlp.w1`` (gate), ``mlp.v1`` (up) and ``mlp.w2``
    (down, transposed), each [E*F, D], with ``num_experts`` E; None for any other layout."""
    mlp = getattr(experts, "mlp", None)
    ws = [getattr(mlp, n, None) for n in ("w1", "v1", "w2")]
    E = getattr(experts, "num_experts", None)
    if not all(isinstance(w, Tensor) and w.dim() == 2 for w in ws) or not isinstance(E, int) or E <= 0:
        return None
    if len({tuple(w.shape) for w in ws}) != 1 or ws[0].shape[0] % E:
        return None
    return ws[0], ws[1], ws[2], E, ws[0].shape[0] // E


def is_hf_moe_block(module: nn.Module) -> bool:
    """Whether ``module`` looks like a transformers MoE block: a child holding 3-D expert weights."""
    return _experts_child(module) is not None and not isinstance(module, nn.ModuleList)


def inspect_block(block: nn.Module, config: Any = None) -> BlockAnatomy:
    """Read a transformers MoE block's structure (no computation). Raises UnsupportedBlock."""
    cls = type(block).__name__
    found = _experts_child(block)
    if found is None:
        raise UnsupportedBlock(
            "no experts module with 3-D gate_up_proj/up_proj and down_proj weights (the transformers v5 "
            "layout), DBRX's mlp.w1/v1/w2 or a list of E alike MLPs was found among the block's children",
            cls,
        )
    ename, experts = found
    attention = [n for n, c in block.named_children() if "attention" in type(c).__name__.lower()]
    if attention:
        raise UnsupportedBlock(
            f"it is a decoder layer: besides its experts it holds attention ({', '.join(attention)}); from_hf reads "
            "an MoE block (router, experts, shared experts, a norm of its output), not the layer around it "
            "(moegraph.optimize on the whole model swaps an MoE written in a decoder layer's forward)", cls)
    split = split_experts(block)
    listed = listed_mlps(experts) if flat_glu(experts) is None and not hasattr(experts, "down_proj") else None
    flat = flat_glu(experts)
    gated = flat is not None or isinstance(getattr(experts, "gate_up_proj", None), Tensor) or (
        listed is not None and len(listed.ups) == 2) or (
        split is not None and experts.weight.shape[1] == 2 * getattr(block, split[1]).weight.shape[2])
    interleaved = gated and getattr(experts, "is_concatenated", True) is False
    clamps: tuple[float | None, float | None] = (None, None)
    custom_act = None
    apply_gate = getattr(type(experts), "_apply_gate", None)
    if flat is not None:
        # DBRX: read into the same [E, 2F, D] / [E, D, F] layout (hf.weights does the copy).
        custom_act = probe_activation(getattr(experts.mlp, "activation_fn", None))
        _, _, _, E_, F_ = flat
        up = torch.empty(E_, 2 * F_, flat[0].shape[1], device="meta")
        down = torch.empty(E_, flat[0].shape[1], F_, device="meta")
    elif split is not None:  # [E, H, D] up and [E, D, F] down in two modules; the block's own activation
        up, down = experts.weight, getattr(block, split[1]).weight
        fn = next((getattr(block, a) for a in ("activation", "act_fn", "act") if getattr(block, a, None) is not None),
                  None)
        custom_act = probe_activation(fn)
    elif listed is not None:
        # A list of E small MLPs: read into the same [E, H, D] / [E, D, F] layout (hf.weights stacks them).
        custom_act = listed.act
        lin_up = getattr(listed.experts[0], listed.ups[0])
        E_, F_, D_ = len(listed.experts), lin_up.out_features, lin_up.in_features
        up = torch.empty(E_, F_ * len(listed.ups), D_, device="meta")
        down = torch.empty(E_, D_, F_, device="meta")
    elif gated and apply_gate is not None:
        try:
            from transformers.integrations.moe import _default_apply_gate
        except ImportError:  # pragma: no cover - older transformers
            _default_apply_gate = None
        if apply_gate is not _default_apply_gate:
            custom_act, clamps = _read_gate_function(experts, interleaved, cls)
    if flat is None and listed is None and split is None:
        up = experts.gate_up_proj if gated else experts.up_proj
        down = experts.down_proj
    E = down.shape[0]
    if up.shape[0] < E:
        raise UnsupportedBlock(f"its experts hold {up.shape[0]} up projections but {E} down projections", cls)
    transposed = False if flat is not None or listed is not None or split is not None else getattr(
        experts, "is_transposed", None)
    if transposed is None:
        # Undecorated experts: up [E, H, D] with down [E, D, F] is the usual [E, out, in] layout;
        # up [E, D, H] with down [E, F, D] is transposed.
        transposed = up.shape[1] == down.shape[2] and up.shape[2] != down.shape[1]
    if transposed:
        D, H = up.shape[1], up.shape[2]
        Fh = down.shape[1]
    else:
        H, D = up.shape[1], up.shape[2]
        Fh = down.shape[2]
    if H != (2 * Fh if gated else Fh) or (down.shape[2] if transposed else down.shape[1]) != D:
        raise UnsupportedBlock(
            f"expert weights {ename}.{'gate_up_proj' if gated else 'up_proj'} {tuple(up.shape)} and down_proj "
            f"{tuple(down.shape)} do not fit one [E, 2F or F, D] / [E, D, F] layout", cls,
        )
    has_bias = bool(getattr(experts, "has_bias", False)) or isinstance(getattr(experts, "down_proj_bias", None), Tensor)
    if listed is not None:
        has_bias = any(getattr(e, n).bias is not None for e in listed.experts for n in (*listed.ups, listed.down))
    act = custom_act or probe_activation(getattr(experts, "act_fn", None))
    if act is None and config is not None and getattr(config, "hidden_act", None):
        try:
            from transformers.activations import ACT2FN

            act = probe_activation(ACT2FN[config.hidden_act])
        except (ImportError, KeyError):
            act = None

    space = _expert_space(block, experts, ename, D, E, cls)
    claimed = {ename, *(n for n in (space.get("pre_proj_name"), space.get("post_proj_name"),
                                    space.get("pre_norm_name")) if n)}
    if space.get("expert_width"):
        D = space["pre_proj_dx"]  # the block's width: what the router, and everything outside the experts, sees
    space.pop("pre_proj_dx", None)
    anat_kwargs: dict[str, Any] = dict(
        **space,
        block_class=cls, experts_name=ename, num_experts=E, hidden_size=D, intermediate_size=Fh, gated=gated,
        transposed=bool(transposed), interleaved=interleaved, expert_bias_terms=has_bias, activation_fn=act,
        gate_clamp=clamps[0], up_clamp=clamps[1],
        expert_layout="flat_glu" if flat is not None else "listed" if listed is not None else "split"
        if split is not None else "3d", split_down_name=split[1] if split is not None else None,
    )

    # Shared experts and their gate: children holding Linear layers from D.
    shared_names: list[str] = []
    shared_gate = None
    for name, child in block.named_children():
        if name in claimed:
            continue
        if isinstance(child, nn.Linear) and child.in_features == D and child.out_features == 1:
            if child.bias is not None:
                raise UnsupportedBlock(f"its shared-expert gate {name} has a bias; the spec's sigmoid gate has none", cls)
            shared_gate = name
            claimed.add(name)
        elif name in _SHARED_NAMES or (_shared_layout(child, D) is not None and "mlp" in type(child).__name__.lower()):
            if _shared_layout(child, D) is None:
                raise UnsupportedBlock(
                    f"shared expert '{name}' ({type(child).__name__}) has no gate_proj/up_proj/down_proj Linear "
                    "layers or [n, F, D] / [n, D, F] tensors to read", cls,
                )
            shared_names.append(name)
            claimed.add(name)
    if len(shared_names) > 1:
        raise UnsupportedBlock(f"it has several shared-expert modules {shared_names}; the spec has one shared MLP", cls)
    if shared_gate is not None and not shared_names:
        raise UnsupportedBlock(f"it has a shared-expert gate '{shared_gate}' but no shared expert", cls)
    if shared_names:
        sh = getattr(block, shared_names[0])
        layout = _shared_layout(sh, D)
        n = 0
        if layout == "stacked":  # n shared experts as [n, F, D] gate/up and [n, D, F] down tensors
            n, S = sh.down_proj.shape[0], sh.down_proj.shape[0] * sh.down_proj.shape[2]
        elif layout == "fused_gate_up":
            S = sh.gate_up_proj.out_features // 2
        elif layout == "gate_up_down":
            S = sh.gate_proj.out_features
        else:
            S = (getattr(sh, "up_proj", None) or sh.fc1).out_features
        if S == 0:
            # A zero-width shared MLP (n_shared_experts=0, shared_expert_intermediate_size=0) adds nothing, through its
            # gate too: read as none (its tensors, empty, and its gate stay claimed; the swap's check compares).
            anat_kwargs["notes"] = [f"its shared expert '{shared_names[0]}' has width 0 (it adds nothing"
                                    + (f", whatever its gate {shared_gate} says" if shared_gate else "")
                                    + "): read as no shared experts"]
            shared_names, shared_gate = [], None
    if shared_names:
        if (layout == "up_down") == gated:
            raise UnsupportedBlock(
                f"shared expert '{shared_names[0]}' is {'plain' if layout == 'up_down' else 'gated'} but the routed "
                f"experts are {'gated' if gated else 'plain'}; the spec uses one activation for both", cls,
            )
        # A norm inside the shared expert (Ergo's: its MLP, then an RMS norm): of its output, which the comparison
        # of the compiled layer with the block checks.
        norms = [(n_, c) for n_, c in sh.named_children() if _norm_child(c, D) is not None]
        if len(norms) > 1:
            raise UnsupportedBlock(f"its shared expert holds several norms {[n_ for n_, _ in norms]}; the spec has one "
                                   "norm of the shared experts' output", cls)
        if norms:
            n_, c = norms[0]
            anat_kwargs.update(shared_norm_name=f"{shared_names[0]}.{n_}",
                               shared_norm=norm_form(c, D, _norm_child(c, D), "shared expert's norm", cls))
        anat_kwargs.update(
            shared_names=tuple(shared_names), shared_layout=layout, shared_intermediate=S, shared_count=n,
            shared_bias_terms=any(isinstance(m, nn.Linear) and m.bias is not None for m in sh.modules()),
            shared_activation_fn=probe_activation(getattr(sh, "act_fn", None) or getattr(sh, "activation_fn", None)),
            shared_gate_name=shared_gate,
        )

    # A norm of the block output (AXK1): a child named *norm* holding one [D] weight and an epsilon. Whether
    # it is an RMS norm of routed + shared (and nothing else) is the probe's to check, on the block's output.
    norms = [(name, _norm_child(child, D)) for name, child in block.named_children()
             if name not in claimed and "norm" in name.lower() and _norm_child(child, D) is not None]
    if len(norms) == 2 and not anat_kwargs.get("expert_width"):
        anat_kwargs["norm_candidates"] = tuple(norms)  # an input norm of the experts and an output norm
        claimed.update(n for n, _ in norms)
    elif norms:
        anat_kwargs.update(output_norm_name=norms[0][0], output_norm_eps=norms[0][1])
        claimed.add(norms[0][0])

    if split is not None:
        claimed.add(split[1])
        # its output bias: a [D] parameter of the block itself
        own = [n for n, p in block.named_parameters(recurse=False) if tuple(p.shape) == (D,)]
        if len(own) == 1:
            anat_kwargs["output_bias_name"] = own[0]
            claimed.add(own[0])

    # The router: the one [E, D] tensor outside the experts and shared experts.
    def outside(name: str) -> bool:
        return name.split(".")[0] not in claimed

    tensors = [(n, t) for n, t in _named_tensors(block) if outside(n)]
    routers = [n for n, t in tensors if t.dim() == 2 and tuple(t.shape) == (E, D)]
    net = None
    if not routers:  # a router that is a small network (Zaya): its last Linear is router.weight
        net = read_router_network(block, claimed, D, E, cls)
        if net is not None:
            routers = [net.weight_name]
            anat_kwargs["router_network"] = net
            tensors = [(n, t) for n, t in tensors if n not in {p for _, p in net.params}]
    if not routers:  # a router with more choices than MLP experts: the rest are identity/zero experts (LongCat)
        routers = [n for n, t in tensors if t.dim() == 2 and t.shape[1] == D and t.shape[0] > E
                   and t.is_floating_point()]
    if len(routers) != 1:
        raise UnsupportedBlock(
            f"expected exactly one router weight of shape [{E}, {D}] outside the experts, found "
            f"{routers or 'none'}", cls,
        )
    rw = routers[0]
    R = dict(tensors)[rw].shape[0]
    n = anat_kwargs.get("shared_count", 0)
    if n and R == E + n:
        # As many rows beyond the experts as stacked shared experts: their weights (the probe checks that the
        # shared experts receive them); the choices the routing picks from are the first E.
        anat_kwargs["shared_routed"] = n
        R = E
    elif R > E:
        # Choices beyond the experts: identity/zero experts, which the experts module handles (read here) or the
        # block around it (the probe sees the experts never receive them, and reads them from the block output).
        anat_kwargs["extra_choices"] = R - E
        try:
            anat_kwargs["identity_experts"], anat_kwargs["zero_experts"] = _extra_experts(experts, E, R, D, cls)
        except UnsupportedBlock as exc:
            anat_kwargs["extra_unread"] = (
                f"expected exactly one router weight of shape [{E}, {D}] outside the experts, found none; {rw} "
                f"{tuple(dict(tensors)[rw].shape)} is not a router over the {E} experts and identity/zero experts "
                f"({exc.reason})")
    owner = rw.rsplit(".", 1)[0] if "." in rw else ""
    rb = f"{owner}.bias" if owner else "bias"
    if net is not None and net.bias_name is None:
        rb = ""  # (the network's last Linear has no bias; its other biases are the network's)
    rb_t = dict(tensors).get(rb)
    router_bias = rb if isinstance(rb_t, Tensor) and rb_t.numel() == R + anat_kwargs.get("shared_routed", 0) else None
    rest = [(n, t) for n, t in tensors if n not in (rw, router_bias)]
    ebias = [n for n, t in rest if t.is_floating_point() and t.numel() == R]
    if len(ebias) > 1:
        raise UnsupportedBlock(f"several E-sized tensors {ebias} could be the expert-selection bias", cls)
    unexplained = tuple(n for n, t in rest if n not in ebias and t.is_floating_point())
    return BlockAnatomy(
        router_weight_name=rw, router_bias_name=router_bias, expert_bias_name=ebias[0] if ebias else None,
        unexplained=unexplained, token_table_name=_token_table(rest, E, config, cls), **anat_kwargs,
    )


def _norm_child(mod: nn.Module, width: int, rows: int = 0) -> float | None:
    """The epsilon of a norm module holding one [width] weight, or with ``rows`` one [rows, width] weight (a row per
    expert), and nothing else (None: not such a norm)."""
    eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
    ps = dict(mod.named_parameters())
    shape = (rows, width) if rows else (width,)
    ok = isinstance(eps, float) and eps > 0 and set(ps) == {"weight"} and tuple(ps["weight"].shape) == shape
    return eps if ok else None


def norm_form(mod: nn.Module, width: int, eps: float, what: str, cls: str, rows: int = 0) -> dict[str, Any]:
    """The spec's ExpertNorm a norm module computes, found numerically on a float32 copy with a random weight: an RMS
    norm whose weight scales as (offset + weight), offset 0 or 1, before or after the norm. With ``rows`` the weight
    has a row per expert, and the module is called as ``norm(v, expert_ids)`` (Ergo's): ``per_expert``."""
    from ..semantics.torch_forms import rms_norm

    probe = copy.deepcopy(mod)
    if any(t.is_meta for t in probe.parameters()):
        probe = probe.to_empty(device="cpu")
    probe = probe.float()
    g = torch.Generator().manual_seed(0)
    v = torch.randn(16, width, generator=g) * 2
    ids = torch.arange(16) % rows if rows else None
    with torch.no_grad():
        probe.weight.copy_(torch.randn(probe.weight.shape, generator=g) * 0.5)
        weight = probe.weight if ids is None else probe.weight[ids]
        try:
            got = probe(v) if ids is None else probe(v, ids)
        except Exception as exc:  # reported as the reason
            raise UnsupportedBlock(f"its {what} {type(mod).__name__} could not be evaluated ({type(exc).__name__}: "
                                   f"{exc})", cls) from exc
        for offset in (0.0, 1.0):
            for scale in ("after", "before"):
                if isinstance(got, Tensor) and got.shape == v.shape and torch.allclose(
                        got, rms_norm(v, eps, weight, offset, scale == "before"), rtol=1e-5, atol=1e-6):
                    return {"kind": "rms", "eps": eps, "weight_offset": offset, "scale": scale,
                            **({"per_expert": True} if rows else {})}
    raise UnsupportedBlock(f"its {what} {type(mod).__name__} is no RMS norm the spec has (weight or 1 + weight, "
                           "applied before or after the norm)", cls)


def _expert_space(block: nn.Module, experts: nn.Module, ename: str, M: int, E: int, cls: str) -> dict[str, Any]:
    """The experts' own space, read by structure: two bias-free Linear children D -> M and M -> D (M the experts'
    width, D != M) around them, a norm child holding one [M] weight (of the projected input), and a norm inside
    the experts holding one [M] weight, which transformers' experts declare as ``has_post_expert_norm`` (each
    expert's output normalised before its weight), or one [E, M] weight, a row per expert (Ergo's: only each
    expert's output can take its expert's row; the comparison of the compiled layer with the block checks where it
    applies). Empty when the experts see the block input."""
    out: dict[str, Any] = {}
    inner = [(n, c, 0) for n, c in experts.named_children() if _norm_child(c, M) is not None]
    inner += [(n, c, E) for n, c in experts.named_children() if _norm_child(c, M, rows=E) is not None]
    if inner:
        if len(inner) != 1 or not (inner[0][2] or getattr(experts, "has_post_expert_norm", False)):
            raise UnsupportedBlock(f"its experts hold norm modules {[n for n, _, _ in inner]} that their class does "
                                   "not declare as a norm of each expert's output (has_post_expert_norm)", cls)
        n, c, rows = inner[0]
        out.update(expert_norm_name=f"{ename}.{n}",
                   expert_norm=norm_form(c, M, _norm_child(c, M, rows), "experts' output norm", cls, rows=rows))
    lins = [(n, c) for n, c in block.named_children() if isinstance(c, nn.Linear) and c.bias is None]
    pre = [(n, c) for n, c in lins if c.out_features == M and c.in_features != M]
    post = [(n, c) for n, c in lins if c.in_features == M and c.out_features != M]
    pairs = [(a, b) for a in pre for b in post if a[1].in_features == b[1].out_features]
    if not pairs:
        return out
    if len(pairs) > 1:
        raise UnsupportedBlock(f"several Linear pairs {[(a[0], b[0]) for a, b in pairs]} could project the experts' "
                               "input and output", cls)
    (pn, pc), (qn, _) = pairs[0]
    out.update(expert_width=M, pre_proj_name=pn, post_proj_name=qn, pre_proj_dx=pc.in_features)
    norms = [(n, c) for n, c in block.named_children() if n != ename and _norm_child(c, M) is not None]
    if len(norms) > 1:
        raise UnsupportedBlock(f"several norms {[n for n, _ in norms]} of the experts' width {M}", cls)
    if norms:
        n, c = norms[0]
        out.update(pre_norm_name=n, pre_norm=norm_form(c, M, _norm_child(c, M), "experts' input norm", cls))
    return out


def _extra_experts(experts: nn.Module, E: int, R: int, D: int, cls: str) -> tuple[int, int]:
    """(identity, zero) counts of the router choices E..R-1 beyond the MLP experts, found by running the
    experts module on one token per such choice with weight 1: each must return its input (identity)
    or zero, the identity ones first (the spec's order)."""
    p = next(experts.parameters())
    if p.is_meta:
        raise UnsupportedBlock(f"its router has {R - E} choices beyond the {E} MLP experts, which can only be read "
                               "from loaded weights (not the meta device)", cls)
    if getattr(getattr(experts, "config", None), "_experts_implementation", "eager") != "eager":
        # The experts' reference (eager) forward says what a choice beyond E is; a grouped one may not handle ids
        # its router never passes it (Zaya hands its skip choice over as expert 0 with weight 0).
        experts = copy.copy(experts)
        experts.config = copy.copy(experts.config)
        experts.config._experts_implementation = "eager"
    x = torch.randn(R - E, D, generator=torch.Generator().manual_seed(0)).to(p)
    # Two choices per token (some experts modules assume K > 1): the choice, and again with weight 0.
    ids = torch.arange(E, R, device=p.device).view(-1, 1).expand(R - E, 2)
    w = torch.tensor([[1.0, 0.0]], dtype=p.dtype, device=p.device).expand(R - E, 2)
    try:
        with torch.no_grad():
            out = experts(x, ids, w)
    except Exception as exc:  # reported as the reason
        raise UnsupportedBlock(f"its router has {R - E} choices beyond the {E} MLP experts and running its experts "
                               f"on them failed ({type(exc).__name__}: {exc})", cls) from exc
    kinds = []
    for i in range(R - E):
        if torch.allclose(out[i], x[i], rtol=1e-5, atol=1e-6):
            kinds.append("identity")
        elif torch.allclose(out[i], torch.zeros_like(x[i]), atol=1e-6):
            kinds.append("zero")
        else:
            raise UnsupportedBlock(f"router choice {E + i} (beyond the {E} MLP experts) is neither an identity nor "
                                   "a zero expert", cls)
    n_id = kinds.count("identity")
    if kinds != ["identity"] * n_id + ["zero"] * (len(kinds) - n_id):
        raise UnsupportedBlock("its zero experts come before identity experts; the spec orders identity first", cls)
    return n_id, len(kinds) - n_id


def _token_table(tensors: list[tuple[str, Tensor]], E: int, config: Any, cls: str) -> str | None:
    """The block's token id -> experts table (a 2-D integer tensor, DeepSeek-V4's ``tid2eid``), checked
    against the experts and the config's vocabulary before any spec is built."""
    tables = [(n, t) for n, t in tensors if t.dim() == 2 and not t.is_floating_point() and t.dtype != torch.bool]
    if not tables:
        return None
    if len(tables) > 1:
        raise UnsupportedBlock(f"several integer tables {[n for n, _ in tables]} could be its token id -> experts "
                               "table", cls)
    name, t = tables[0]
    V, K = t.shape
    if K > E:
        raise UnsupportedBlock(f"its token table {name} has {K} experts per token but there are {E} experts", cls)
    vocab = getattr(config, "vocab_size", None) if config is not None else None
    if isinstance(vocab, int) and vocab != V:
        raise UnsupportedBlock(f"its token table {name} has {V} rows but the config's vocab_size is {vocab}; "
                               "a token id -> experts table needs one row per token id", cls)
    if not t.is_meta and t.numel() and (int(t.min()) < 0 or int(t.max()) >= E):
        raise UnsupportedBlock(f"its token table {name} holds expert ids in [{int(t.min())}, {int(t.max())}], "
                               f"outside the {E} experts", cls)
    return name


def _shared_layout(mod: nn.Module, D: int) -> str | None:
    def lin(name: str) -> nn.Linear | None:
        m = getattr(mod, name, None)
        return m if isinstance(m, nn.Linear) else None

    if lin("gate_proj") and lin("up_proj") and lin("down_proj") and lin("gate_proj").in_features == D:
        return "gate_up_down"
    if lin("gate_up_proj") and lin("down_proj") and lin("gate_up_proj").in_features == D:
        return "fused_gate_up"
    stacked = [getattr(mod, w, None) for w in ("gate_proj", "up_proj", "down_proj")]
    if all(isinstance(t, Tensor) and t.dim() == 3 for t in stacked):
        g, u, d = stacked
        n, Fs = g.shape[0], g.shape[1]
        if tuple(g.shape) == tuple(u.shape) == (n, Fs, D) and tuple(d.shape) == (n, D, Fs):
            return "stacked"
    up = lin("up_proj") or lin("fc1")
    down = lin("down_proj") or lin("fc2")
    if up is not None and down is not None and up.in_features == D and not lin("gate_proj"):
        return "up_down"
    return None
