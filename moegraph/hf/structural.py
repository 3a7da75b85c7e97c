"""A second source of block anatomy: a user's own naive MoE block, read from its structure.

The registry path (``anatomy``, ``probe``, ``routing``) reads transformers blocks by their known
layout. This module reads a block made of a router ``nn.Linear`` with E outputs and an
``nn.ModuleList`` of E identical expert MLPs (and optionally one shared MLP): the block is traced
with torch.fx where it is traceable, to confirm that the router's output reaches a top-k that
selects the experts; it is then probed with stand-in experts that return known vectors, which
reveals for every token the experts chosen and their weights (a ``probe.Probe``, explained by the
same ``routing.identify_routing`` as registry blocks), and each expert MLP is read from its own FX
graph (linear -> act -> linear, or act(gate) * up -> down). ``moegraph.optimize`` (``swap``) uses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnsupportedBlock
from ..runtime import CompiledMoEBase
from .anatomy import BlockAnatomy, probe_activation
from .assemble import build_spec
from .probe import Probe, light_copy
from .routing import Routing, identify_routing
from .train_mode import dropout_note, expert_mode_note, mode_note
from .vocab import DTYPE_NAMES, GATED_ACT, PLAIN_ACT

__all__ = ["MLPForm", "StructuralRead", "read_mlp", "read_structural", "structural_parts"]


@dataclass
class MLPForm:
    """An MLP read from its FX graph: act(x A^T) -> C, or act(x A^T) * (x B^T) -> C."""

    gated: bool
    act: str
    up: tuple[str, ...]  # names of the Linear children: (gate, up) if gated else (up,)
    down: str
    intermediate: int
    bias: bool


#: dropout called as a function (``F.dropout(h, p, self.training)``; torch.dropout under it)
_DROPOUT_FNS = (F.dropout, torch.dropout)


def read_mlp(mod: nn.Module, D: int) -> MLPForm:
    """Read an expert/shared MLP's structure from its FX graph. Raises UnsupportedBlock."""
    name = type(mod).__name__
    try:
        gm = fx.symbolic_trace(mod)
    except Exception as exc:  # noqa: BLE001 - any tracing failure makes the MLP unreadable
        raise UnsupportedBlock(f"expert MLP {name} is not traceable by torch.fx ({type(exc).__name__}: {exc})") from None
    mods = dict(gm.named_modules())
    linears: dict[fx.Node, str] = {}
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")

    def identity_in_eval(n: fx.Node) -> bool:
        # dropout (a module, or called as a function) is the identity in eval(), which the layer computes; that it
        # is not in train() is the read's training note (``train_mode``)
        return (n.op == "call_module" and isinstance(mods.get(n.target), (nn.Dropout, nn.Identity))
                or n.op == "call_function" and n.target in _DROPOUT_FNS)

    def through_identity(n: Any) -> Any:
        while isinstance(n, fx.Node) and identity_in_eval(n):
            n = n.args[0]
        return n

    act_of: dict[fx.Node, tuple[fx.Node, str]] = {}
    mul: list[fx.Node] = []
    out = None
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(mods.get(n.target), nn.Linear):
            linears[n] = n.target
        elif n.op == "output":
            out = through_identity(n.args[0])
        elif n.op in ("call_module", "call_function", "call_method") and len(n.args) >= 1:
            src = through_identity(n.args[0])
            if n.op == "call_function" and n.target in (torch.mul, __import__("operator").mul) and len(n.args) == 2:
                mul.append(n)
                continue
            if identity_in_eval(n):
                continue
            if n.op == "call_module":
                m = mods[n.target]
                if any(True for _ in m.parameters()):
                    continue
                fn: Callable = m
            elif n.op == "call_function":
                kw = dict(n.kwargs)
                fn = (lambda t, f=n.target, kw=kw: f(t, **kw))
            else:
                kw = dict(n.kwargs)
                fn = (lambda t, meth=n.target, kw=kw: getattr(t, meth)(**kw))
            if isinstance(src, fx.Node) and src in linears and len(n.args) == 1:
                act = probe_activation(fn)
                if act is not None:
                    act_of[n] = (src, act)
    if out is None or out not in linears:
        raise UnsupportedBlock(f"expert MLP {name} does not end with a Linear layer")
    down = out
    a = through_identity(down.args[0])
    lin_mod = {n: mods[t] for n, t in linears.items()}
    if a in act_of and len(linears) == 2:
        up, act = act_of[a]
        if through_identity(up.args[0]) is not x:
            raise UnsupportedBlock(f"expert MLP {name}: its first Linear does not read the input")
        ups: tuple[fx.Node, ...] = (up,)
        gated = False
    elif a in mul and len(linears) == 3:
        p, q = (through_identity(v) for v in a.args)
        if p in act_of and q in linears:
            (g, act), u = act_of[p], q
        elif q in act_of and p in linears:
            (g, act), u = act_of[q], p
        else:
            raise UnsupportedBlock(f"expert MLP {name} is not act(gate(x)) * up(x) -> down")
        if through_identity(g.args[0]) is not x or through_identity(u.args[0]) is not x:
            raise UnsupportedBlock(f"expert MLP {name}: gate and up projections do not both read the input")
        ups = (g, u)
        gated = True
    else:
        raise UnsupportedBlock(
            f"expert MLP {name} is neither down(act(up(x))) nor down(act(gate(x)) * up(x)) with a known activation "
            f"(found {len(linears)} Linear layers)"
        )
    table = GATED_ACT if gated else PLAIN_ACT
    if act not in table:
        raise UnsupportedBlock(f"expert MLP {name}: a {'gated' if gated else 'plain'} {act} MLP has no spec activation")
    Fh = lin_mod[ups[0]].out_features
    if any(lin_mod[u].in_features != D or lin_mod[u].out_features != Fh for u in ups) or \
            lin_mod[down].in_features != Fh or lin_mod[down].out_features != D:
        raise UnsupportedBlock(f"expert MLP {name}: Linear shapes do not form D -> F -> D with D = {D}")
    bias = any(lin_mod[n].bias is not None for n in (*ups, down))
    return MLPForm(gated, act, tuple(linears[u] for u in ups), linears[down], Fh, bias)


def _mlp_weights(mod: nn.Module, form: MLPForm) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(w_up [H, D], w_down [D, F], b_up [H], b_down [D]) of one MLP (missing biases as zeros)."""
    ups = [mod.get_submodule(n) for n in form.up]
    down = mod.get_submodule(form.down)
    w_up = torch.cat([u.weight for u in ups], 0)
    b_up = torch.cat([u.bias if u.bias is not None else u.weight.new_zeros(u.out_features) for u in ups], 0)
    b_down = down.bias if down.bias is not None else down.weight.new_zeros(down.out_features)
    return w_up, down.weight, b_up, b_down


@dataclass
class StructuralRead:
    spec: Any
    weights: dict[str, Tensor]
    output_kind: tuple[str, ...]
    routing: Routing
    notes: list[str]
    input_rank: int  # 3 ([B, S, D]) or 2 ([T, D]): what the block accepted
    weights_of: Callable[[nn.Module], dict[str, Tensor]]  # ``weights`` from a block of this structure
    #: what the block does in train() mode that the layer does not (dropout, router noise): also in ``notes``
    training: list[str] = field(default_factory=list)


class _ExpertStub(nn.Module):
    """Stands in for expert e in the probe: remembers the rows it got, returns its signature vector."""

    def __init__(self, sig_D: Tensor):
        super().__init__()
        self.sig_D = sig_D
        self.rows: list[Tensor] = []

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.rows.append(x.detach().reshape(-1, x.shape[-1]).float())
        return self.sig_D.to(x.dtype).expand(*x.shape[:-1], self.sig_D.shape[-1]).clone()


def structural_parts(block: nn.Module) -> tuple[str, str, list[str]] | None:
    """(router child, experts ModuleList child, other MLP children) of a naive MoE block, or None."""
    if isinstance(block, (nn.ModuleList, nn.ModuleDict, nn.Sequential, CompiledMoEBase)):
        return None
    children = dict(block.named_children())
    lists = [
        n for n, c in children.items()
        if isinstance(c, nn.ModuleList) and len(c) >= 2 and len({type(m) for m in c}) == 1
        and any(isinstance(s, nn.Linear) for s in c[0].modules())
    ]
    for ln in lists:
        E = len(children[ln])
        first_lin = next(s for s in children[ln][0].modules() if isinstance(s, nn.Linear))
        D = first_lin.in_features
        routers = [n for n, c in children.items() if isinstance(c, nn.Linear) and c.out_features == E
                   and c.in_features == D]
        if len(routers) == 1:
            others = [n for n, c in children.items() if n not in (ln, routers[0])
                      and any(True for _ in c.parameters())]
            return routers[0], ln, others
    return None


def _fx_evidence(block: nn.Module, router: str, experts: str) -> tuple[bool | None, str]:
    """Trace the block with the router and experts as leaves: does the router reach a top-k?

    Returns (True, "") when the graph shows router -> ... -> topk and expert calls; (False, why)
    when it traces but shows no such path; (None, why) when it is not traceable.
    """

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname == router or qualname.startswith(experts + ".") or super().is_leaf_module(m, qualname)

    try:
        graph = Tracer().trace(block)
    except Exception as exc:  # noqa: BLE001 - untraceable code is kept as a leaf: probing decides
        return None, f"not traceable by torch.fx ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    nodes = list(graph.nodes)
    r = [n for n in nodes if n.op == "call_module" and n.target == router]
    calls = {n.target for n in nodes if n.op == "call_module" and str(n.target).startswith(experts + ".")}
    if not r:
        return False, f"the traced graph never calls the router {router}"
    seen, stack, topk = set(), list(r), False
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if (n.op == "call_function" and n.target is torch.topk) or (n.op == "call_method" and n.target == "topk"):
            topk = True
            break
        stack.extend(n.users)
    if not topk:
        return False, f"the router {router}'s output never reaches a top-k in the traced graph"
    if not calls:
        return False, f"the traced graph never calls the experts in {experts}"
    return True, ""


def read_structural(block: nn.Module, *, tokens: int = 32, seed: int = 0, name: str | None = None) -> StructuralRead:
    """Explain a user's naive MoE block as a spec + weights, or raise UnsupportedBlock with the reason."""
    cls = type(block).__name__
    parts = structural_parts(block)
    if parts is None:
        raise UnsupportedBlock("no router nn.Linear with one output per expert of an nn.ModuleList of experts", cls)
    rname, ename, others = parts
    router: nn.Linear = getattr(block, rname)
    experts: nn.ModuleList = getattr(block, ename)
    E, D = router.out_features, router.in_features
    forms = [read_mlp(m, D) for m in experts]
    if any(f != forms[0] for f in forms[1:]):
        raise UnsupportedBlock(f"the experts in {ename} do not all have the same MLP structure", cls)
    form = forms[0]
    shared_forms = []
    for o in others:
        try:
            shared_forms.append(read_mlp(getattr(block, o), D))
        except UnsupportedBlock as exc:
            raise UnsupportedBlock(f"child '{o}' is neither router nor expert nor a shared MLP: {exc.reason}", cls) from None
    if len(shared_forms) > 1:
        raise UnsupportedBlock(f"several shared MLPs {others}; the spec has one shared MLP", cls)
    if shared_forms and (shared_forms[0].gated != form.gated or shared_forms[0].act != form.act):
        raise UnsupportedBlock(f"shared MLP '{others[0]}' uses another activation than the experts", cls)
    traced, why = _fx_evidence(block, rname, ename)
    if traced is False:
        raise UnsupportedBlock(why, cls)
    notes = [] if traced else [f"block {why}; routing identified by probing only"]

    # Probe: stand-in experts with known signature vectors reveal ids and weights per token.
    g = torch.Generator().manual_seed(seed)
    heavy = (ename, *others)
    light = light_copy(block, heavy)
    light = light.float().eval()
    sig_ED = torch.randn(E, D, generator=g)
    shared_sig = torch.randn(D, generator=g)
    with torch.no_grad():
        lr = getattr(light, rname)
        lr.weight.copy_(torch.randn(lr.weight.shape, generator=g) / math.sqrt(D))
        if lr.bias is not None:
            lr.bias.copy_(torch.randn(lr.bias.shape, generator=g) * 0.3)
        stubs = nn.ModuleList([_ExpertStub(sig_ED[e]) for e in range(E)])
        light._modules[ename] = stubs
        shared_stubs = [_ExpertStub(shared_sig) for _ in others]
        for o, s in zip(others, shared_stubs):
            light._modules[o] = s
        x = torch.randn(1, tokens, D, generator=g)
        out, rank = None, 3
        for attempt in (x, x.view(tokens, D)):
            try:
                out = light(attempt)
                rank = attempt.dim()
                break
            except Exception as exc:  # noqa: BLE001 - try the other input rank, then report
                err = exc
        if out is None:
            raise UnsupportedBlock(f"probing it with random tokens failed: {type(err).__name__}: {err}", cls)
        logits = F.linear(x.view(tokens, D), lr.weight, lr.bias)
    y = out[0] if isinstance(out, tuple) else out
    if not isinstance(y, Tensor) or y.numel() != tokens * D:
        raise UnsupportedBlock("its output is not one hidden vector per token", cls)
    y = y.reshape(tokens, D).float()
    xt = x.view(tokens, D)
    hits: list[list[int]] = [[] for _ in range(tokens)]
    for e, s in enumerate(stubs):
        for rows in s.rows:
            if rows.numel() == 0:
                continue
            eq = (rows[:, None, :] == xt[None]).all(-1)
            if not bool(eq.any(-1).all()):
                raise UnsupportedBlock(
                    "its experts receive transformed tokens, not the block input (e.g. scaled by the router score); "
                    "the spec applies routing weights to expert outputs", cls,
                )
            for t in eq.int().argmax(-1).tolist():
                hits[t].append(e)
    for s in shared_stubs:
        rows = torch.cat(s.rows) if s.rows else torch.empty(0, D)
        if rows.shape[0] != tokens or not torch.equal(rows, xt):
            raise UnsupportedBlock("its shared MLP does not run once on every token", cls)
    K = len(hits[0])
    if K == 0 or any(len(h) != K or len(set(h)) != K for h in hits):
        raise UnsupportedBlock(
            "tokens reach different numbers of experts (capacity limits or thresholds); the structural reader "
            "supports dropless top-k routing", cls,
        )
    ids = torch.tensor(hits, dtype=torch.long)
    target = y - (shared_sig if shared_stubs else 0.0)
    C = sig_ED[ids]  # [T, K, D]
    w = torch.linalg.lstsq(C.transpose(1, 2), target.unsqueeze(-1)).solution.squeeze(-1)  # [T, K]
    resid = (torch.einsum("tkd,tk->td", C, w) - target).abs().max()
    if float(resid) > 1e-4 * max(1.0, float(target.abs().max())):
        raise UnsupportedBlock(
            f"its output is not a weighted sum of the chosen experts' outputs{' plus the shared MLP' if others else ''} "
            f"(residual {float(resid):.2e}); it transforms or adds to them in a way the spec cannot express", cls,
        )
    probe = Probe(xt, logits, None, ids, w, ("tensor",))
    routing, rnotes = identify_routing(probe, None, cls)
    notes += rnotes
    # (the experts have one structure: the first stands for all, a copy of each being the cost of the check)
    mlps = {f"the experts ({ename}.0 run)": experts[0]} | {o: getattr(block, o) for o in others}
    training = [n for n in (dropout_note(block), _train_mode_note(light, ename, others, sig_ED, shared_sig,
                                                                  (x if rank == 3 else xt).clone(), out),
                            expert_mode_note(mlps, xt[:4])) if n]
    notes += training
    kind: tuple[str, ...] = ("tensor",)
    if isinstance(out, tuple):
        kind = ("tuple", *("router_logits" if isinstance(e, Tensor) and e.shape == logits.shape
                          and torch.allclose(e.float(), logits, atol=1e-5) else "unknown" for e in out[1:]))

    # The anatomy read from the structure, assembled into a spec like a registry block's.
    shared = shared_forms[0] if shared_forms else None
    anat = BlockAnatomy(
        block_class=cls, experts_name=ename, num_experts=E, hidden_size=D, intermediate_size=form.intermediate,
        gated=form.gated, transposed=False, interleaved=False, expert_bias_terms=form.bias,
        activation_fn=form.act, router_weight_name=f"{rname}.weight",
        router_bias_name=f"{rname}.bias" if router.bias is not None else None, expert_bias_name=None,
        shared_names=tuple(others), shared_intermediate=shared.intermediate if shared else 0,
        shared_bias_terms=bool(shared and shared.bias), shared_activation_fn=shared.act if shared else None,
    )
    dtype = DTYPE_NAMES.get(experts[0].get_submodule(form.up[0]).weight.dtype,
                            DTYPE_NAMES.get(router.weight.dtype, "float32"))
    spec = build_spec(anat, routing, None, dtype, notes,
                      name or "structural-" + "".join(ch if ch.isalnum() else "-" for ch in cls.lower()),
                      description=f"{cls} read structurally: {routing.describe()}",
                      source="moegraph.optimize structural match (FX + probing)")
    weights_of = partial(_structural_weights, anat=anat, form=form, shared=shared, rname=rname, ename=ename)
    return StructuralRead(spec, weights_of(block), kind, routing, notes, rank, weights_of, training)


def _train_mode_note(light: nn.Module, ename: str, others: list[str], sig_ED: Tensor, shared_sig: Tensor, x: Tensor,
                     out: Any) -> str | None:
    """``train_mode.mode_note`` of the probe copy (fresh stand-in experts): the same tokens in train() mode."""
    def run() -> Any:
        light._modules[ename] = nn.ModuleList([_ExpertStub(sig) for sig in sig_ED])
        for o in others:
            light._modules[o] = _ExpertStub(shared_sig)
        light.train()
        try:
            return light(x)
        finally:
            light.eval()

    return mode_note(run, out[0] if isinstance(out, tuple) else out)


def _structural_weights(block: nn.Module, *, anat: BlockAnatomy, form: MLPForm, shared: MLPForm | None,
                        rname: str, ename: str) -> dict[str, Tensor]:
    """The block's weights in the compiled layer's layout (experts stacked from the ModuleList)."""
    router: nn.Linear = getattr(block, rname)
    ew = [_mlp_weights(m, form) for m in getattr(block, ename)]
    bias = anat.expert_bias_terms or anat.shared_bias_terms
    up = "gate_up_proj" if form.gated else "up_proj"
    weights = {
        "router.weight": router.weight,
        f"experts.{up}": torch.stack([w[0] for w in ew]),
        "experts.down_proj": torch.stack([w[1] for w in ew]),
    }
    if router.bias is not None:
        weights["router.bias"] = router.bias
    if bias:
        weights[f"experts.{up}_bias"] = torch.stack([w[2] for w in ew])
        weights["experts.down_proj_bias"] = torch.stack([w[3] for w in ew])
    if shared is not None:
        sw = _mlp_weights(getattr(block, anat.shared_names[0]), shared)
        weights[f"shared_experts.{up}"] = sw[0]
        weights["shared_experts.down_proj"] = sw[1]
        if bias:
            weights[f"shared_experts.{up}_bias"] = sw[2]
            weights["shared_experts.down_proj_bias"] = sw[3]
    return weights
