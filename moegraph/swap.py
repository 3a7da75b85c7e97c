"""``moegraph.optimize``: swap every MoE block of a model for a compiled moegraph layer, same weights.

Blocks are found two ways:

- **registry**: transformers MoE blocks (any family whose experts use the v5 3-D layout), read by
  ``moegraph.hf`` (anatomy, routing probed on a light copy, combine checked);
- **structure**: a user's own block made of a router ``nn.Linear`` with E outputs and an
  ``nn.ModuleList`` of E identical expert MLPs (and optionally shared MLPs). The block is traced
  with torch.fx where it is traceable, to confirm that the router's output reaches a top-k that
  selects the experts; it is then probed with stand-in experts that return known vectors, which
  reveals for every token the experts chosen and their weights, and each expert MLP is read from
  its own FX graph (linear -> act -> linear, or act(gate) * up -> down).

A block that cannot be explained (routing not in the spec language, an expert that is not a plain
MLP, extra outputs the adapter cannot reproduce, weights on the meta device or sharded as DTensor)
is left in place and reported with the reason; nothing is guessed. Structural swaps are always
checked numerically; registry swaps when ``verify=True``. A swap that fails its check is undone and
reported with the difference.

The swapped-in module (``MoEBlockAdapter``) takes the hidden states the original took (any leading
shape) and returns what the original returned: the tensor, or (tensor, router_logits).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import hf
from .errors import InputError, MoegraphError, UnsupportedBlock
from .runtime import CompiledMoEBase

__all__ = ["MoEBlockAdapter", "OptimizeReport", "SwapRecord", "optimize", "read_structural"]


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


@dataclass
class SwapRecord:
    """What happened to one block."""

    path: str
    block_class: str
    found_by: str  # "registry" (transformers) or "structure"
    status: str  # "swapped", "refused", "restored" (swap undone after a failed check), "skipped"
    reason: str = ""
    spec_name: str = ""
    spec_hash: str = ""
    routing: str = ""
    max_abs_diff: float | None = None
    rel_diff: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        head = f"{self.status:8s} {self.path} ({self.block_class}, {self.found_by})"
        if self.status == "swapped":
            s = f"{head}: {self.spec_name} [{self.spec_hash[:12]}] {self.routing}"
            if self.rel_diff is not None:
                s += f"; verified, max diff {self.max_abs_diff:.2e} ({self.rel_diff:.1e} of scale)"
            return s
        return f"{head}: {self.reason}"


@dataclass
class OptimizeReport:
    """Printable (``print(report)`` or ``rich.print(report)``) record of an ``optimize`` call."""

    model_class: str
    backend: str
    records: list[SwapRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def swapped(self) -> list[SwapRecord]:
        return [r for r in self.records if r.status == "swapped"]

    @property
    def not_swapped(self) -> list[SwapRecord]:
        return [r for r in self.records if r.status != "swapped"]

    def summary(self) -> str:
        if not self.records:
            return f"{self.model_class}: no MoE blocks found; the model is unchanged"
        return (f"{self.model_class}: swapped {len(self.swapped)} of {len(self.records)} MoE blocks "
                f"(backend {self.backend}, {self.seconds:.2f} s)")

    def __str__(self) -> str:
        lines = [self.summary()]
        lines += ["  " + r.line() for r in self.records]
        lines += [f"  note: {n}" for n in self.notes]
        for r in self.records:
            lines += [f"  note ({r.path}): {n}" for n in r.notes]
        return "\n".join(lines)

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        t = Table(title=self.summary(), title_justify="left", show_lines=True)
        t.add_column("block", overflow="fold", ratio=3)
        t.add_column("status", no_wrap=True)
        t.add_column("spec / reason", overflow="fold", ratio=5)
        t.add_column("check", overflow="fold", ratio=1)
        colour = {"swapped": "green", "refused": "red", "restored": "yellow", "skipped": "dim"}
        for r in self.records:
            what = f"{r.spec_name} [{r.spec_hash[:12]}] {r.routing}" if r.status == "swapped" else r.reason
            check = "" if r.rel_diff is None else f"{r.max_abs_diff:.1e} ({r.rel_diff:.0e} rel)"
            t.add_row(Text(f"{r.path}\n{r.block_class} ({r.found_by})"), Text(r.status, style=colour.get(r.status, "")),
                      Text(what), Text(check))
        notes = [Text(f"note: {n}") for n in self.notes]
        notes += [Text(f"note ({r.path}): {n}") for r in self.records for n in r.notes]
        return Group(t, *notes)


# ----------------------------------------------------------------------------------------------
# The swapped-in module
# ----------------------------------------------------------------------------------------------


class MoEBlockAdapter(nn.Module):
    """Runs a compiled moegraph layer with the calling convention of the block it replaced.

    ``output_kind`` is ("tensor",) or ("tuple", "router_logits", ...): the original's return value.
    """

    def __init__(self, layer: nn.Module, output_kind: tuple[str, ...], original_class: str, found_by: str):
        super().__init__()
        self.moe = layer
        self.output_kind = tuple(output_kind)
        self.original_class = original_class
        self.found_by = found_by

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any):
        extra = [a for a in args if a is not None] + [k for k, v in kwargs.items() if v is not None]
        if extra:
            raise InputError(
                f"the moegraph layer that replaced {self.original_class} takes only the hidden states, but was also "
                f"given {len(extra)} more argument(s) ({', '.join(str(k) for k in extra if isinstance(k, str))}); "
                "restore the original block (moegraph.optimize(..., verify=True) reports swaps) or report this"
            )
        D = self.moe.HIDDEN
        shape = hidden_states.shape
        x = hidden_states if hidden_states.dim() in (2, 3) else hidden_states.reshape(-1, D)
        y = self.moe(x).reshape(shape)
        if self.output_kind[0] == "tensor":
            return y
        extras = []
        for kind in self.output_kind[1:]:
            r = self.moe.router
            extras.append(F.linear(x.reshape(-1, D).to(r.weight.dtype), r.weight, getattr(r, "bias", None)))
            assert kind == "router_logits", f"adapter cannot produce {kind}"
        return (y, *extras)

    def extra_repr(self) -> str:
        return f"replaces={self.original_class}, found_by={self.found_by}"


# ----------------------------------------------------------------------------------------------
# Structural reading of a user's own MoE block
# ----------------------------------------------------------------------------------------------


@dataclass
class MLPForm:
    """An MLP read from its FX graph: act(x A^T) -> C, or act(x A^T) * (x B^T) -> C."""

    gated: bool
    act: str
    up: tuple[str, ...]  # names of the Linear children: (gate, up) if gated else (up,)
    down: str
    intermediate: int
    bias: bool


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

    def through_identity(n: Any) -> Any:
        while isinstance(n, fx.Node) and n.op == "call_module" and isinstance(mods.get(n.target), (nn.Dropout, nn.Identity)):
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
            if n.op == "call_module":
                m = mods[n.target]
                if isinstance(m, (nn.Dropout, nn.Identity)) or any(True for _ in m.parameters()):
                    continue
                fn: Callable = m
            elif n.op == "call_function":
                kw = dict(n.kwargs)
                fn = (lambda t, f=n.target, kw=kw: f(t, **kw))
            else:
                kw = dict(n.kwargs)
                fn = (lambda t, meth=n.target, kw=kw: getattr(t, meth)(**kw))
            if isinstance(src, fx.Node) and src in linears and len(n.args) == 1:
                act = hf.probe_activation(fn)
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
    table = hf.GATED_ACT if gated else hf.PLAIN_ACT
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
    routing: hf.Routing
    notes: list[str]
    input_rank: int  # 3 ([B, S, D]) or 2 ([T, D]): what the block accepted


class _ExpertStub(nn.Module):
    """Stands in for expert e in the probe: remembers the rows it got, returns its signature vector."""

    def __init__(self, sig_D: Tensor):
        super().__init__()
        self.sig_D = sig_D
        self.rows: list[Tensor] = []

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.rows.append(x.detach().reshape(-1, x.shape[-1]).float())
        return self.sig_D.to(x.dtype).expand(*x.shape[:-1], self.sig_D.shape[-1]).clone()


def _structural_parts(block: nn.Module) -> tuple[str, str, list[str]] | None:
    """(router child, experts ModuleList child, other MLP children) of a naive MoE block, or None."""
    if isinstance(block, (nn.ModuleList, nn.ModuleDict, nn.Sequential, CompiledMoEBase, MoEBlockAdapter)):
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
    from .loader import load_spec

    cls = type(block).__name__
    parts = _structural_parts(block)
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
    light = hf.light_copy(block, heavy)
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
    probe = hf.Probe(xt, logits, None, ids, w, ("tensor",))
    routing, rnotes = hf.identify_routing(probe, None, cls)
    notes += rnotes
    kind: tuple[str, ...] = ("tensor",)
    if isinstance(out, tuple):
        kind = ("tuple", *("router_logits" if isinstance(e, Tensor) and e.shape == logits.shape
                          and torch.allclose(e.float(), logits, atol=1e-5) else "unknown" for e in out[1:]))

    # The spec and the weights in the compiled layer's layout.
    dtype = hf.DTYPE_NAMES.get(router.weight.dtype, "float32")
    ew = [_mlp_weights(m, form) for m in experts]
    table = hf.GATED_ACT if form.gated else hf.PLAIN_ACT
    bias = form.bias or any(f.bias for f in shared_forms)
    moe: dict[str, Any] = {
        "hidden_size": D,
        "experts": {"num_experts": E, "intermediate_size": form.intermediate, "activation": table[form.act],
                    "bias": bias},
        "router": {**routing.router_dict(), "router_bias": router.bias is not None},
        "dtype": hf.DTYPE_NAMES.get(ew[0][0].dtype, dtype),
    }
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
    if shared_forms:
        sf = shared_forms[0]
        moe["shared_experts"] = {"count": 1}
        if sf.intermediate != form.intermediate:
            moe["shared_experts"]["intermediate_size"] = sf.intermediate
        sw = _mlp_weights(getattr(block, others[0]), sf)
        weights[f"shared_experts.{up}"] = sw[0]
        weights["shared_experts.down_proj"] = sw[1]
        if bias:
            weights[f"shared_experts.{up}_bias"] = sw[2]
            weights["shared_experts.down_proj_bias"] = sw[3]
    spec = load_spec({
        "name": name or "structural-" + "".join(ch if ch.isalnum() else "-" for ch in cls.lower()),
        "description": f"{cls} read structurally: {routing.describe()}",
        "source": "moegraph.optimize structural match (FX + probing)",
        "moe": moe,
    }, source=f"structural {cls}")
    return StructuralRead(spec, weights, kind, routing, notes, rank)


# ----------------------------------------------------------------------------------------------
# optimize
# ----------------------------------------------------------------------------------------------


def _refusal_for_placement(block: nn.Module) -> str | None:
    for n, t in list(block.named_parameters()) + list(block.named_buffers()):
        if t.is_meta:
            return f"weights are on the meta device ({n}); load the weights before optimising"
        if type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor":
            return (f"weight {n} is a sharded DTensor; moegraph does not re-shard weights in optimize (gather the "
                    "model first, or compile the spec with a plan for expert parallelism)")
    return None


def _verify(original: nn.Module, adapter: nn.Module, D: int, rank: int, dtype: torch.dtype, device: torch.device,
            tokens: int = 16) -> tuple[float, float]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(1, tokens, D, generator=g).to(device=device, dtype=dtype)
    if rank == 2:
        x = x.view(tokens, D)
    modes = (original.training, adapter.training)
    original.eval()
    adapter.eval()
    try:
        with torch.no_grad():
            ref = original(x.clone())
            ref = ref[0] if isinstance(ref, tuple) else ref
            y = adapter(x.clone())
            y = y[0] if isinstance(y, tuple) else y
    finally:
        original.train(modes[0])
        adapter.train(modes[1])
    diff = float((y.float() - ref.float()).abs().max())
    return diff, diff / max(float(ref.float().abs().max()), 1e-12)


def _set_child(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and name.isdigit():
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


def _looks_like_moe(m: nn.Module) -> bool:
    """A module with a child called like experts: worth a line in the report if nothing matched it."""
    return any("expert" in n.lower() and "shared" not in n.lower() for n, _ in m.named_children())


def optimize(
    model: nn.Module,
    *,
    backend: str = "torch",
    plan: Any = None,
    verify: bool = False,
    share_weights: bool = True,
    out_dir: Any = None,
    structural: bool = True,
) -> nn.Module:
    """Swap every MoE block of ``model`` for a compiled moegraph layer with the same weights.

    Args:
        model: any ``nn.Module`` (a transformers model, or a user's model with naive MoE blocks).
        backend: "torch" or "triton", as for ``moegraph.compile``.
        plan: a placement Plan (or plan file) for the compiled layers (single-process: attached to
            each layer whose spec it was made for; others are refused with the reason).
        verify: check each transformers block numerically against its replacement on random
            tokens and undo the swap on failure (structural swaps are always checked).
        share_weights: the compiled layers use the model's own Parameter objects where the layouts
            agree (no extra memory; an optimizer built before still updates them). Otherwise copies.
        structural: also match user blocks by structure (router Linear + ModuleList of expert MLPs).
    Returns:
        ``model`` itself, changed in place, with ``model.moegraph_report`` (an ``OptimizeReport``).
    """
    from .compiler import compile as mg_compile

    if not isinstance(model, nn.Module):
        raise InputError(f"moegraph.optimize takes a torch.nn.Module, got {type(model).__name__}")
    if backend not in ("torch", "triton"):
        raise InputError(f"unknown backend {backend!r}; choose torch or triton")
    t0 = time.perf_counter()
    report = OptimizeReport(type(model).__name__, backend)
    if plan is not None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            raise InputError("moegraph.optimize with a plan under torch.distributed is not supported: it would have "
                             "to shard each block's weights across ranks; compile the spec with the plan and load "
                             "each rank's experts instead")

    # Step 1: find candidate blocks, outermost first; never look inside one already claimed.
    candidates: list[tuple[str, nn.Module, str]] = []
    claimed: list[str] = []
    for path, m in model.named_modules():
        if any(path == c or path.startswith(c + ".") for c in claimed):
            continue
        if isinstance(m, (MoEBlockAdapter, CompiledMoEBase)):
            claimed.append(path)
            continue
        if hf.is_hf_moe_block(m):
            candidates.append((path, m, "registry"))
            claimed.append(path)
        elif structural and _structural_parts(m) is not None:
            candidates.append((path, m, "structure"))
            claimed.append(path)
        elif _looks_like_moe(m) and any(True for _ in m.parameters()):
            report.records.append(SwapRecord(
                path or "<model>", type(m).__name__, "name", "skipped",
                "has an experts child but matches neither a transformers MoE layout (experts with 3-D "
                "gate_up_proj/down_proj) nor the structural pattern (router Linear + ModuleList of expert MLPs)",
            ))
            claimed.append(path)

    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "output_router_logits", False):
        report.notes.append("config.output_router_logits is set: swapped blocks no longer expose router logits to "
                            "transformers' output recorder, so its auxiliary loss misses them")

    # Step 2: read, compile, swap (and check) each candidate.
    for path, block, how in candidates:
        ts = time.perf_counter()
        rec = SwapRecord(path, type(block).__name__, how, "refused")
        report.records.append(rec)
        why = _refusal_for_placement(block)
        if why:
            rec.reason = why
            continue
        try:
            if how == "registry":
                info = hf.read_block(block)
                weights = hf.hf_weights(block, info.anatomy)
                spec, kind, routing, notes = info.spec, info.output_kind, info.routing, info.notes
                rank = 3
            else:
                sr = read_structural(block)
                spec, kind, routing, notes, weights = sr.spec, sr.output_kind, sr.routing, sr.notes, sr.weights
                rank = sr.input_rank
            if "unknown" in kind:
                raise UnsupportedBlock("it returns extra outputs besides the hidden states that the swapped-in layer "
                                       "cannot reproduce", type(block).__name__)
            ref = next(iter(weights.values()))
            dtype = hf.torch_dtype_of(weights)
            layer = mg_compile(spec, plan=plan, backend=backend, out_dir=out_dir, dtype=dtype, device=ref.device,
                               seed=None)
            hf.load_hf_weights(layer, weights, share=share_weights)
        except MoegraphError as exc:
            rec.reason = getattr(exc, "reason", None) or str(exc)
            rec.seconds = time.perf_counter() - ts
            continue
        adapter = MoEBlockAdapter(layer, kind, type(block).__name__, how)
        adapter.train(block.training)
        rec.spec_name, rec.spec_hash, rec.routing, rec.notes = spec.name, spec.hash(), routing.describe(), list(notes)
        if verify or how == "structure":
            try:
                diff, rel = _verify(block, adapter, spec.moe.hidden_size, rank, layer.experts.down_proj.dtype,
                                    layer.experts.down_proj.device)
            except Exception as exc:  # noqa: BLE001 - reported; the original block stays
                rec.reason = f"verification could not run: {type(exc).__name__}: {exc}"
                rec.seconds = time.perf_counter() - ts
                continue
            rec.max_abs_diff, rec.rel_diff = diff, rel
            if not rel <= hf.tolerance(layer.experts.down_proj.dtype):
                rec.status = "restored"
                rec.reason = (f"verification failed: outputs differ by {diff:.3g} ({rel:.2e} of the output scale, "
                              f"tolerance {hf.tolerance(layer.experts.down_proj.dtype):.0e}); original block kept")
                rec.seconds = time.perf_counter() - ts
                continue
        _set_child(model, path, adapter)
        rec.status = "swapped"
        rec.seconds = time.perf_counter() - ts
    report.seconds = time.perf_counter() - t0
    model.moegraph_report = report
    return model
