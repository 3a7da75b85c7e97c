"""``moegraph.optimize``: swap every MoE block of a model for a compiled moegraph layer, same weights.

Blocks are found two ways:

- **registry**: transformers MoE blocks (any family whose experts use the v5 3-D layout), read by
  ``moegraph.hf`` (anatomy, routing probed on a light copy, combine checked);
- **structure**: a user's own block made of a router ``nn.Linear`` with E outputs and an
  ``nn.ModuleList`` of E identical expert MLPs (and optionally shared MLPs), read by
  ``moegraph.hf.structural`` (FX evidence of router -> top-k, probing with stand-in experts, each
  expert MLP read from its own FX graph).

- **inline**: an MoE with no module of its own, written into its host layer's forward (Gemma 4's
  decoder layer calls router, norm, experts, norm in turn), found by watching one forward of the
  model (``moegraph.hf.inline``) and read as a block made of the host's own children.

A block that cannot be explained (routing not in the spec language, an expert that is not a plain
MLP, extra outputs the adapter cannot reproduce, weights on the meta device or sharded as DTensor)
is left in place and reported with the reason; nothing is guessed. Structural swaps are always
checked numerically; registry swaps when ``verify=True``. A swap that fails its check is undone and
reported with the difference.

The swapped-in module (``MoEBlockAdapter``) takes the hidden states the original took (any leading
shape) and returns what the original returned: the tensor, or (tensor, router_logits). An inline MoE
is computed where its host calls the router (``InlineRouterAdapter``); the host's other calls in the
chain pass the result on, and the whole model's logits are compared before and after.

The swapped model keeps the original's state dict (names, dtypes, values; ``hf.state_names``: a
checkpoint saved after the swap loads into the original model, and an original one into the swapped
model), and hands transformers the router logits its output recording takes from the blocks' routers
(``output_router_logits``; ``hf.router_record``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import hf
from .errors import InputError, MoegraphError, UnsupportedBlock
from .hf.inline import InlineChain, InlineMoE, inline_hosts, run_seeded, watch
from .hf.probe import forward_args
from .hf.router_record import RouterRecord, read_router_record, record_router_logits
from .hf.state_names import OriginalNames, Unmappable, WeightMap
from .hf.structural import read_structural, structural_parts
from .hf.train_mode import PendingTrainingWarning
from .runtime import CompiledMoEBase
from .semantics import torch_dtype

__all__ = ["InlineRouterAdapter", "MoEBlockAdapter", "OptimizeReport", "SwapRecord", "optimize", "read_structural"]


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


@dataclass
class SwapRecord:
    """What happened to one block."""

    path: str
    block_class: str
    found_by: str  # "registry" (transformers), "structure" or "inline" (in a host layer's forward)
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
    ``arg_names``: the original forward's arguments after the hidden states (positional arguments are
    matched to them by position); ``token_arg``: the one among them carrying token ids. Token ids go
    to the layer when its spec routes by them (hash routing) and are ignored otherwise (the importer
    checked that the original's routing does not change with them); any other argument given a value
    is refused, since the layer cannot honour it.
    """

    def __init__(self, layer: nn.Module, output_kind: tuple[str, ...], original_class: str, found_by: str,
                 arg_names: tuple[str, ...] = (), token_arg: str | None = None, flat_output: bool = False,
                 flattened: bool = False, state_arg: str | None = None):
        super().__init__()
        self.state_arg = state_arg  # the argument carrying the previous layer's router state (Zaya)
        self.flat_output = flat_output  # return [tokens, D] as the original did (Llama 4)
        self.flattened = flattened  # return the output and router logits flattened to 1-D (Ernie 4.5 VL)
        self.moe = layer
        self.output_kind = tuple(output_kind)
        self.original_class = original_class
        self.found_by = found_by
        self.arg_names = tuple(arg_names)
        self.token_arg = token_arg
        self.router_record: RouterRecord | None = None  # where transformers' router_logits come from (optimize)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any):
        given = dict(zip(self.arg_names, args))
        given.update(kwargs)
        extra = [f"argument {i + 2}" for i in range(len(self.arg_names), len(args)) if args[i] is not None]
        token_ids = given.pop(self.token_arg, None) if self.token_arg else None
        state = given.pop(self.state_arg, None) if self.state_arg else None
        extra += [k for k, v in given.items() if v is not None]
        if extra:
            raise InputError(
                f"the moegraph layer that replaced {self.original_class} takes the hidden states"
                + (f" and {self.token_arg}" if self.token_arg else "") + f", but was also given {', '.join(extra)}; "
                "restore the original block (moegraph.optimize(..., verify=True) reports swaps) or report this"
            )
        D = self.moe.HIDDEN
        shape = hidden_states.shape
        x = hidden_states if hidden_states.dim() in (2, 3) else hidden_states.reshape(-1, D)
        tid = None
        if token_ids is not None and self.moe.NEEDS_TOKEN_IDS:  # the spec routes by them; else ignored
            tid = token_ids.reshape(x.shape[:-1]) if token_ids.numel() == x[..., 0].numel() else token_ids
        if self.moe.ROUTER_STATE:  # takes the previous layer's router state (if it adds one), returns its own
            y, state = self.moe(x, tid, router_state=state if self.moe.RECEIVES_ROUTER_STATE else None)
            y = y.reshape(shape)
        else:
            y = self.moe(x, tid).reshape(shape)
        if self.flat_output or self.flattened:
            y = y.reshape(-1) if self.flattened else y.reshape(-1, D)
        out = y
        if self.output_kind[0] != "tensor":
            extras = []
            for kind in self.output_kind[1:]:
                if kind == "router_state":
                    extras.append(state)
                    continue
                assert kind == "router_logits", f"adapter cannot produce {kind}"
                logits = self._router_logits(x)
                extras.append(logits.reshape(-1) if self.flattened else logits)
            out = (y, *extras)
        if self.router_record is not None:  # transformers collecting router logits (output_router_logits=True)
            keep = self.router_record.keep_shape
            record_router_logits(self.router_record, lambda: self._router_logits(x, keep), out, self.original_class)
        return out

    def _router_logits(self, x: Tensor, keep_shape: bool = False) -> Tensor:
        """The router's logits of the hidden states, as the block's router linear gives them: [tokens, E], or with
        ``keep_shape`` [*x.shape[:-1], E] (a router recorded on [B, S, D], ``RouterRecord.keep_shape``)."""
        r = self.moe.router
        out = F.linear(x.reshape(-1, self.moe.HIDDEN).to(r.weight.dtype), r.weight, getattr(r, "bias", None))
        return out.reshape(*x.shape[:-1], out.shape[-1]) if keep_shape else out

    def extra_repr(self) -> str:
        return f"replaces={self.original_class}, found_by={self.found_by}"


class InlineRouterAdapter(MoEBlockAdapter):
    """Stands in for the router of an MoE written inline in its host (``hf.inline``): computes the whole MoE
    (routing, norms, experts) there and returns a tuple as the router did, the result in the slot the host
    hands to the experts first and None in the others; ``InlineResult`` in the experts' place returns it."""

    def __init__(self, layer: nn.Module, chain: InlineChain, original_class: str):
        super().__init__(layer, ("tensor",), original_class, "inline")
        self.outputs, self.slot = chain.router_outputs, chain.expert_args[0]

    def forward(self, hidden_states: Tensor) -> tuple[Tensor | None, ...]:
        out: list[Tensor | None] = [None] * self.outputs
        out[self.slot] = super().forward(hidden_states)
        return tuple(out)


class InlineResult(nn.Module):
    """Stands in for the experts of an inline MoE: returns the MoE output the router's stand-in computed,
    which the host passes as the experts' first argument after the hidden states."""

    def forward(self, hidden_states: Tensor, result: Tensor, *rest: Any) -> Tensor:
        return result


def _swap_inline(host: nn.Module, chain: InlineChain, adapter: InlineRouterAdapter) -> dict[str, nn.Module]:
    """Put the stand-ins into ``host``; returns the children they replaced (to undo the swap)."""
    new = {chain.router: adapter, chain.experts: InlineResult()}
    for norm in (chain.pre_norm, chain.post_norm):
        if norm:
            new[norm] = nn.Identity()  # the compiled layer applies it (experts.input_norm / output_norm)
    old = {name: getattr(host, name) for name in new}
    for name, m in new.items():
        setattr(host, name, m)
    return old


def _structural_parts(block: nn.Module) -> tuple[str, str, list[str]] | None:
    """``hf.structural.structural_parts``, never for a block this module already swapped in."""
    return None if isinstance(block, MoEBlockAdapter) else structural_parts(block)


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


def _verify(original: nn.Module, adapter: MoEBlockAdapter, D: int, rank: int, dtype: torch.dtype,
            device: torch.device, tokens: int = 16) -> tuple[float, float]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(1, tokens, D, generator=g).to(device=device, dtype=dtype)
    if rank == 2:
        x = x.view(tokens, D)
    kwargs = {}
    if adapter.token_arg:  # both get the same random token ids, used or not
        kwargs[adapter.token_arg] = torch.randint(0, hf.token_vocab(original), x.shape[:-1], generator=g).to(device)
    modes = (original.training, adapter.training)
    original.eval()
    adapter.eval()
    try:
        with torch.no_grad():
            ref = original(x.clone(), **kwargs)
            ref = ref[0] if isinstance(ref, tuple) else ref
            y = adapter(x.clone(), **kwargs)
            y = y[0] if isinstance(y, tuple) else y
    finally:
        original.train(modes[0])
        adapter.train(modes[1])
    diff = float((y.float() - ref.float()).abs().max())
    return diff, diff / max(float(ref.float().abs().max()), 1e-12)


def _check_inline(model: nn.Module, swaps: dict[str, tuple[SwapRecord, dict[str, nn.Module]]], ids: Tensor,
                  ref: Tensor) -> None:
    """Compare the model's logits with those watched before any swap; undo every inline swap if they moved."""
    try:
        logits = run_seeded(model, ids)
        diff = float((logits.float() - ref.float()).abs().max())
        rel = diff / max(float(ref.float().abs().max()), 1e-12)
        problem = None if rel <= hf.tolerance(ref.dtype) else (
            f"the model's logits moved by {diff:.3g} ({rel:.2e} of their scale, tolerance "
            f"{hf.tolerance(ref.dtype):.0e}) with the MoE of its layers swapped; original layers kept")
    except Exception as exc:  # noqa: BLE001 - reported; the original layers come back
        diff = rel = float("nan")
        problem = f"the model did not run with the MoE of its layers swapped ({type(exc).__name__}: {exc})"
    for path, (rec, old) in swaps.items():
        rec.max_abs_diff, rec.rel_diff = diff, rel
        if problem:
            host = model.get_submodule(path)
            for name, m in old.items():
                setattr(host, name, m)
            rec.status, rec.reason = "restored", problem


def _registry_weights(block: nn.Module, *, anatomy: Any) -> dict[str, Tensor]:
    """A transformers block's weights in the compiled layer's layout (FP8 experts: their bytes and block scales)."""
    return hf.hf_weights(block, anatomy) | hf.block_scales(block, anatomy)


def _inline_names(chain: InlineChain) -> dict[str, str]:
    """``InlineMoE``'s child names -> the host's."""
    return {ours: theirs for ours, theirs in (("router", chain.router), ("experts", chain.experts),
                                              ("pre_norm", chain.pre_norm), ("post_norm", chain.post_norm)) if theirs}


def _original_names(rec: SwapRecord, block: nn.Module, weights_of: WeightMap, layer_prefix: str,
                    rename: dict[str, str] | None = None) -> OriginalNames | None:
    """The map that keeps a swapped block's state under its original names (``hf.state_names``); None, with a
    note, where the map cannot be inverted."""
    try:
        names = OriginalNames(block, weights_of, layer_prefix, rename)
        if names.untrained:
            rec.notes.append(f"the swapped layer does not use {', '.join(names.untrained)} (trainable in the "
                             "original block): training the swapped model leaves them as they are")
        return names
    except Exception as exc:  # noqa: BLE001 - Unmappable, or a block that cannot be copied as a skeleton: noted
        why = str(exc) if isinstance(exc, Unmappable) else f"{type(exc).__name__}: {exc}"
        rec.notes.append(f"state_dict() and save_pretrained use the compiled layer's names here ({why}); a checkpoint "
                         "saved from this model loads back only into a swapped model")
        return None


def _note_copies(rec: SwapRecord, block: nn.Module, layer: nn.Module, names: OriginalNames | None) -> None:
    """With ``share_weights``, a note naming the block's trainable parameters the layer holds as copies (another
    layout): an optimizer built before the swap holds the originals, which no longer train."""
    held = {id(p) for p in layer.parameters()}
    unused = set(names.untrained) if names is not None else set()  # (noted already)
    copied = [n for n, p in block.named_parameters() if p.requires_grad and p.numel() and id(p) not in held
              and n not in unused]
    if copied:
        rec.notes.append(f"{len(copied)} trainable parameter(s) of the block are copied into the compiled layer rather "
                         f"than shared ({', '.join(copied[:3])}{', ...' if len(copied) > 3 else ''}): an optimizer "
                         "built before optimize does not train them; build it after")


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
            agree (no extra memory). Otherwise copies. Weights the layer holds in another layout (shared
            gate and up concatenated, Llama 4's transposed or LongCat's sliced experts, ...) are copies
            either way, named in the report: an optimizer built before ``optimize`` does not train them,
            so build the optimizer after it.
        structural: also match user blocks by structure (router Linear + ModuleList of expert MLPs).
    A compiled layer has no dropout and no training-time router noise (jitter, ``if self.training`` noise): a
    swapped block with either gets a report note and a warning, since in train() mode it then differs from the
    original (the checks run in eval mode, where they agree): at once for a model in train() mode, else the first
    time the model is set to train() mode (a model optimized for inference is not warned about).
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

    # Step 1: find candidate blocks, outermost first; never look inside one already claimed. Layers that
    # may hold an MoE inline are watched through one forward of the whole model first.
    hosts = inline_hosts(model)
    chains, watched_ids, watched_logits = watch(model, hosts) if hosts else ({}, None, None)
    candidates: list[tuple[str, nn.Module, str]] = []
    claimed: list[str] = []
    for path, m in model.named_modules():
        if any(path == c or path.startswith(c + ".") for c in claimed):
            continue
        if isinstance(m, (MoEBlockAdapter, CompiledMoEBase)):
            claimed.append(path)
            continue
        if isinstance(chains.get(path), InlineChain):
            candidates.append((path, InlineMoE(m, chains[path]), "inline"))
            claimed.append(path)
        elif path in chains:  # a decoder layer with experts whose forward does not show a chain the swap keeps
            report.records.append(SwapRecord(
                path, type(m).__name__, "inline", "refused",
                "a decoder layer with its MoE written in its forward, but not as a chain the swap can keep: "
                + chains[path]))
            claimed.append(path)
        elif hf.is_hf_moe_block(m):
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
    router_logits = cfg is not None and bool(getattr(cfg, "output_router_logits", False))

    # Step 2: read, compile, swap (and check) each candidate.
    inline_swaps: dict[str, tuple[SwapRecord, dict[str, nn.Module], OriginalNames | None]] = {}
    training: dict[str, tuple[str, list[str]]] = {}  # path -> (class, what it does in training that the layer does not)
    layers: dict[str, nn.Module] = {}  # path -> its compiled layer
    for path, block, how in candidates:
        ts = time.perf_counter()
        rec = SwapRecord(path, type(model.get_submodule(path) if how == "inline" else block).__name__, how, "refused")
        report.records.append(rec)
        why = _refusal_for_placement(block)
        if why:
            rec.reason = why
            continue
        try:
            if how in ("registry", "inline"):
                info = hf.read_block(block)
                weights_of = partial(_registry_weights, anatomy=info.anatomy)
                weights = weights_of(block)
                spec, kind, routing, notes = info.spec, info.output_kind, info.routing, info.notes
                rank, token_arg, flat, flattened = 3, info.token_arg, info.flat_output, info.flattened
                state_arg, training[path] = info.state_arg, (rec.block_class, info.training)
            else:
                sr = read_structural(block)
                spec, kind, routing, notes, weights = sr.spec, sr.output_kind, sr.routing, sr.notes, sr.weights
                rank, token_arg, flat, flattened, state_arg = sr.input_rank, None, False, False, None
                weights_of, training[path] = sr.weights_of, (rec.block_class, sr.training)
            if "unknown" in kind:
                raise UnsupportedBlock("it returns extra outputs besides the hidden states that the swapped-in layer "
                                       "cannot reproduce", type(block).__name__)
            if "router_logits" in kind and getattr(spec.moe.router, "mlp", ()):
                raise UnsupportedBlock("it returns the router logits of a router network (router.mlp), which the "
                                       "swapped-in layer does not return", type(block).__name__)
            ref = next(iter(weights.values()))
            # FP8 experts: the layer computes in the spec's dtype; otherwise in that of the block's weights
            dtype = torch_dtype(spec.moe.dtype) if spec.moe.quantization is not None else hf.torch_dtype_of(weights)
            layer = mg_compile(spec, plan=plan, backend=backend, out_dir=out_dir, dtype=dtype, device=ref.device,
                               seed=None)
            hf.load_hf_weights(layer, weights, share=share_weights)
            layers[path] = layer
            record = read_router_record(model, path, block, spec.moe.hidden_size, layer.router.weight,
                                        getattr(layer.router, "bias", None), layer.compute_dtype)
            if record is not None and record.source == "refused" and router_logits:
                raise UnsupportedBlock(f"config.output_router_logits is set (transformers' auxiliary loss reads the "
                                       f"router logits), but {record.reason}", type(block).__name__)
        except MoegraphError as exc:
            rec.reason = getattr(exc, "reason", None) or str(exc)
            rec.seconds = time.perf_counter() - ts
            continue
        rec.spec_name, rec.spec_hash, rec.routing, rec.notes = spec.name, spec.hash(), routing.describe(), list(notes)
        if record is not None and record.source == "refused":
            rec.notes.append(f"forward(output_router_logits=True) raises with this block swapped: {record.reason}")
        if how == "inline":  # checked in step 3, on the whole model
            adapter = InlineRouterAdapter(layer, block.chain, type(block.router).__name__)
            adapter.router_record = record
            adapter.train(block.training)
            names = _original_names(rec, block, weights_of, f"{block.chain.router}.moe.", _inline_names(block.chain))
            if share_weights:
                _note_copies(rec, block, layer, names)
            inline_swaps[path] = (rec, _swap_inline(model.get_submodule(path), block.chain, adapter), names)
            rec.status = "swapped"
            rec.seconds = time.perf_counter() - ts
            continue
        adapter = MoEBlockAdapter(layer, kind, type(block).__name__, how, tuple(forward_args(block)), token_arg,
                                  flat, flattened, state_arg)
        adapter.router_record = record
        adapter.train(block.training)
        if verify or how == "structure":
            try:
                target, tol = (hf.check_target(block, info.anatomy, layer) if how == "registry"
                               else (block, hf.tolerance(layer.compute_dtype)))
                diff, rel = _verify(target, adapter, spec.moe.hidden_size, rank, layer.compute_dtype,
                                    layer.experts.down_proj.device)
            except Exception as exc:  # noqa: BLE001 - reported; the original block stays
                rec.reason = f"verification could not run: {type(exc).__name__}: {exc}"
                rec.seconds = time.perf_counter() - ts
                continue
            rec.max_abs_diff, rec.rel_diff = diff, rel
            if not rel <= tol:
                rec.status = "restored"
                rec.reason = (f"verification failed: outputs differ by {diff:.3g} ({rel:.2e} of the output scale, "
                              f"tolerance {tol:.0e}); original block kept")
                rec.seconds = time.perf_counter() - ts
                continue
        names = _original_names(rec, block, weights_of, "moe.")
        if share_weights:
            _note_copies(rec, block, layer, names)
        _set_child(model, path, adapter)
        if names is not None:
            names.register(adapter)
        rec.status = "swapped"
        rec.seconds = time.perf_counter() - ts
    # Step 3: inline swaps change the host's children, not a block: the whole model is compared on the
    # tokens it was watched with, and every inline swap is undone if its logits moved.
    if inline_swaps:
        _check_inline(model, {p: (rec, old) for p, (rec, old, _) in inline_swaps.items()}, watched_ids, watched_logits)
        for path, (rec, _, names) in inline_swaps.items():
            if rec.status == "swapped" and names is not None:
                names.register(model.get_submodule(path))
    report.seconds = time.perf_counter() - t0
    model.moegraph_report = report
    noted = [r.path for r in report.swapped if training.get(r.path, ("", []))[1]]
    PendingTrainingWarning.attach([layers[p] for p in noted], {p: training[p] for p in noted},
                                  "moegraph.optimize (eval outputs are equal; see model.moegraph_report)",
                                  now=any(layers[p].training for p in noted))
    return model
