"""Code generation: spec -> template context -> Python source -> imported layer class.

Decisions are made here and passed to the template as plain values; the template
(``codegen_templates/moe_layer.py.j2``) only spells them out. The environment uses
``StrictUndefined`` so a missing context key is an error, not an empty string.

Generated files are named ``moe_<name>_<spec-hash12>_<backend>.py``. They are written only when their
content changes, and imported modules are cached by the sha256 of their source. A cache entry whose
content does not match its recorded hash (a corrupted or hand-edited file) is detected and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import linecache
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import jinja2

from . import __version__
from .errors import CodegenError
from .fileio import write_atomically
from .resources import templates_dir
from .codegen_safe import FILTERS, Code, check_module, finalize
from .semantics import activations as _activations
from .semantics import combine as _combine
from .semantics import expr as _expr
from .semantics import routing as _routing
from .semantics.scores import torch_score_code
from .spec import MoESpec, UniformTopology, triton_fp8_problems

_ENV: jinja2.Environment | None = None


def template_env() -> jinja2.Environment:
    """The one Jinja environment over codegen_templates/ (StrictUndefined), shared by every backend."""
    global _ENV
    if _ENV is None:
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(templates_dir())),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            # Every printed value goes through the one escaping path (moegraph.codegen_safe).
            finalize=finalize,
        )
        env.filters.update(FILTERS)
        _ENV = env
    return _ENV


def _score_code(score: str) -> Code:
    """Torch code computing scores_TE from logits_TE for a score name or expression.

    Emitted node by node from the validated parse tree (``semantics.scores``), never from the text.
    """
    return Code(torch_score_code(score, "logits_TE"))


def _devices(spec: MoESpec) -> int:
    topo = spec.topology
    return topo.num_gpus if isinstance(topo, UniformTopology) else len(topo.devices)


def _aux_calls(spec: MoESpec) -> list[dict[str, Any]]:
    r, E = spec.moe.router, spec.moe.experts.router_choices
    softmax = getattr(r, "score", "softmax") == "softmax"
    K = spec.moe.top_k
    out = []
    for loss in getattr(r, "aux_losses", ()):
        args3 = f"logits_TE, scores_TE, topk_ids_TK, {softmax}"
        if loss.kind == "expert_balance":
            call = f"runtime.expert_balance_loss({args3})"
        elif loss.kind == "global_balance":
            call = f"runtime.expert_balance_loss({args3}, global_batch=True)"
        elif loss.kind == "sequence_balance":
            call = (f"runtime.sequence_balance_loss(logits_TE.view(B, S, {E}), scores_TE.view(B, S, {E}), "
                    f"topk_ids_TK.view(B, S, {K}), {softmax})")
        elif loss.kind in ("device_balance", "comm_balance"):
            nd = _devices(spec)
            if E % nd:
                raise CodegenError(
                    f"spec '{spec.name}': moe.router.aux_losses {loss.kind} needs experts ({E}) to split evenly "
                    f"over the topology's {nd} devices; change topology or drop the loss"
                )
            if loss.kind == "device_balance":
                call = f"runtime.device_balance_loss({args3}, {nd})"
            else:
                g = getattr(r, "groups", None)
                reach = min(g.topk_groups if g is not None and g.tie_to == "device" else K, nd)
                call = f"runtime.comm_balance_loss({args3}, {nd}, {reach})"
        elif loss.kind == "z_loss":
            call = "runtime.z_loss(logits_TE)"
        else:  # pragma: no cover - the spec's Literal forbids this
            raise CodegenError(f"unknown aux loss kind {loss.kind!r}")
        out.append({"kind": loss.kind, "coef": float(loss.coef), "call": Code(call)})
    return out


def class_name(spec: MoESpec) -> str:
    base = re.sub(r"[^0-9a-zA-Z]+", " ", spec.name).title().replace(" ", "")
    if not base or not base[0].isalpha():
        base = "Spec" + base
    name = f"{base}MoE"
    assert name.isidentifier() and name.isascii(), f"class name {name!r} is not a plain identifier"
    return name


def router_mlp_steps(mlp: tuple[Any, ...], width: int) -> tuple[tuple, list[Code], Code]:
    """A router network (``router.mlp``): the layers' (op, width in, width out, flag) for the runtime's
    parameters, one line of torch code per layer from ``xr_TD`` on (the state step keeps ``state_TH``), and
    the name of the network's output. Activations are emitted from their parsed tree (``semantics.activations``)."""
    layers, lines, cur = [], [], "xr_TD"
    for i, layer in enumerate(mlp):
        p = f"self.router.mlp[{i}]"
        if layer.op == "linear":
            layers.append(("linear", width, layer.size, layer.bias))
            width = layer.size
            line = f"h_TH = F.linear({cur}, {p}.weight{f', {p}.bias' if layer.bias else ''})"
        elif layer.op == "rms_norm":
            layers.append(("rms_norm", width, width, False))
            line = f"h_TH = runtime.rms_norm({cur}, {float(layer.eps)!r}, {p}.weight)"
        elif layer.op == "activation":
            layers.append(("activation", width, width, False))
            tree = _activations.activation(layer.function).tree
            line = "h_TH = " + _expr.emit(tree, {"x": cur}, _expr.torch_call)
        else:
            layers.append(("state", width, width, layer.receive))
            if layer.receive:
                lines.append(Code(f"h_TH = {cur} + router_state_BSH.reshape(-1, {width}).to({cur}.dtype) * {p}.scale  "
                                  "# plus the previous layer's router state"))
                cur = "h_TH"
            lines.append(Code(f"state_TH = {cur}  # this layer's router state, returned for the next layer"))
            continue
        lines.append(Code(line))
        cur = "h_TH"
    return tuple(layers), lines, Code(cur)


def context(spec: MoESpec, backend: str = "torch") -> dict[str, Any]:
    """Everything the template needs, decided here."""
    m = spec.moe
    r = m.router
    gated = m.experts.gated
    # Comments name the activation by its entry's plain-word name (an inline expression's is derived).
    act_name = _activations.activation(m.experts.activation).name
    K = m.top_k
    router_layers, router_lines, router_out = router_mlp_steps(getattr(r, "mlp", ()), m.hidden_size)
    groups = getattr(r, "groups", None)
    limited = _routing.limits_groups(groups)  # a group limit that keeps every group masks nothing: no step
    policy = _routing.TopKPolicy.of_router(r) if r.type == "topk" else None
    ctx: dict[str, Any] = {
        "version": __version__,
        "backend": backend,
        "op_namespace": "moegraph_triton" if backend == "triton" else "moegraph",
        # codegen.block_m fixes the Triton kernels' row block (the torch backend has none)
        "triton_block_m": spec.codegen.block_m if backend == "triton" else None,
        "spec_name": spec.name,
        "spec_hash": spec.hash(),
        # ensure_ascii: the JSON is plain ASCII, so it can be written as a raw literal (|block).
        "spec_json": "\n" + json.dumps(spec.model_dump(mode="json"), sort_keys=True, indent=4, ensure_ascii=True)
        + "\n",
        "class_name": class_name(spec),
        "summary": f"{r.type} routing over {m.experts.num_experts} {act_name} experts"
        + (f", {m.shared_experts.count} shared" if m.shared_experts.count else ""),
        "D": m.hidden_size,
        "E": m.experts.num_experts,
        "R": m.experts.router_choices,
        "identity_experts": m.experts.identity_experts,
        "F": m.experts.intermediate_size,
        "K": K,
        "gated": gated,
        # The expert op takes the spec's activation: a name or expression the semantics table resolves.
        "act": m.experts.activation,
        "activation": act_name,
        "up_name": "gate_up_proj" if gated else "up_proj",
        "gate_clamp": m.experts.gate_clamp,
        "up_clamp": m.experts.up_clamp,
        "expert_bias_terms": m.experts.bias,
        "input_scaled": m.experts.routing_weight == "input",
        "shared_intermediate": m.shared_experts.count * m.shared_intermediate_size,
        "shared_gate": m.shared_experts.gate == "sigmoid",
        # shared_experts.gate: router: shared experts weighted by their own router rows, stored one by one
        "shared_routed": m.shared_experts.count if m.shared_experts.gate == "router" else 0,
        # shared_experts.combine: None for the plain sum (the code adds, as it always has)
        "combine": None if _combine.is_sum(m.shared_experts.combine)
        else Code(_combine.torch_combine_code(m.shared_experts.combine, "y_TD", "shared_TD")),
        "router_type": r.type,
        "router_dtype": m.router_dtype,
        "router_bias": bool(getattr(r, "router_bias", False)),
        "expert_bias": getattr(r, "expert_bias", None) is not None,
        "expert_bias_rate": r.expert_bias.update_rate if getattr(r, "expert_bias", None) is not None else None,
        "hash_vocab": getattr(r, "vocab_size", None) or 0,
        "hash_seed": getattr(r, "seed", 0),
        "hash_method": getattr(r, "method", "random"),
        "jitter": getattr(r, "jitter", 0.0),
        "score": getattr(r, "score", None) or "softmax",
        "score_code": _score_code(getattr(r, "score", None) or "softmax"),
        "hash_scored": r.type == "hash" and r.score is not None,
        "topk_then_score": getattr(r, "topk_order", "") == "topk_then_score",
        # topk_then_score's softmax over the chosen logits sums to 1 already: normalize has nothing to divide there.
        "normalize": policy.divides_by_sum if policy else getattr(r, "normalize", False),
        "normalize_elided": bool(policy and policy.normalize and not policy.divides_by_sum),
        "scaling_factor": float(getattr(r, "scaling_factor", 1.0)),
        "groups": groups if limited else None,
        "groups_all_kept": groups.num_groups if groups is not None and not limited else 0,
        "capacity": getattr(r, "capacity", None),
        "capacity_factor": getattr(r, "capacity_factor", None),
        "aux_losses": _aux_calls(spec) if r.type != "hash" else [],
        "fp8": _fp8_context(m),
        "output_norm_eps": m.output_norm.eps if m.output_norm is not None else None,
        "output_bias": m.output_bias,
        # Router transforms (top-k routers only; off for the others).
        "input_norm": getattr(r, "input_norm", None),
        "logit_scale": getattr(r, "learned_logit_scale", False),
        "logit_softcap": getattr(r, "logit_softcap", None),
        "sparsemixer_eps": r.sparsemixer.jitter_eps if getattr(r, "sparsemixer", None) is not None else None,
        "per_expert_scale": getattr(r, "per_expert_scale", False),
        "weight_scale": getattr(r, "learned_weight_scale", False),
        "router_mlp": (router_layers, router_lines, router_out),
        "router_state": r.router_state if r.type == "topk" else None,
        "router_state_width": next((w for op, _, w, _ in router_layers if op == "state"), 0),
        "bias_on_logits": getattr(getattr(r, "expert_bias", None), "applies_to", "scores") == "logits",
        # The experts' own space (moe.expert_projection) and a norm of each expert's output (experts.output_norm):
        # the names of the experts' input, output and per-assignment rows follow the space they live in.
        "projection": m.expert_projection,
        "expert_input_norm": m.experts.input_norm,
        "expert_output_norm": m.experts.output_norm,
        "shared_norm": m.shared_experts.output_norm,
        "xe": "xe_TM" if m.expert_projection is not None else "xe_TD" if m.experts.input_norm is not None else "x_TD",
        "ye": "y_TM" if m.expert_projection is not None else "y_TD",
        "ye_rows": "ye_NM" if m.expert_projection is not None else "ye_ND",
    }
    return ctx


def _fp8_context(m: Any) -> dict[str, Any] | None:
    """The FP8 settings the layer and its op calls need (None: experts in the layer dtype)."""
    q = m.quantization
    if q is None:
        return None
    return {"block_out": q.weight_block[0], "block_in": q.weight_block[1], "tile": q.activation_tile[1],
            "format": q.format, "scale_format": q.scale_format, "shared": q.shared_experts}


#: code generators; compile() adds what each needs at run time
BACKENDS = ("torch", "triton")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise CodegenError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def render(spec: MoESpec, backend: str = "torch") -> str:
    """The generated Python source for a spec (byte-identical for the same spec and version).

    The source is parsed again and refused unless it has the expected shape (``check_module``).
    """
    check_backend(backend)
    if backend == "triton":
        # The rules MoESpec checks for codegen.backend: triton, for a backend chosen at compile time.
        problems = triton_fp8_problems(spec.moe, "compile with backend='torch'")
        if problems:
            raise CodegenError(f"spec {spec.name!r}: " + "; ".join(f"{field}: {message}" for field, message in problems))
    try:
        source = template_env().get_template("moe_layer.py.j2").render(**context(spec, backend))
    except jinja2.TemplateError as exc:
        raise CodegenError(f"rendering moe_layer.py.j2 for spec {spec.name!r} failed: {exc}") from exc
    check_module(source, f"generated layer for spec {spec.name!r}")
    return source


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


@dataclass(frozen=True)
class Generated:
    path: Path
    source: str
    digest: str
    written: bool  # False when the file already had this content


#: where generated code goes when no ``out_dir`` is given (None: ~/.cache/moegraph/generated); set with
#: ``set_cache_dir``. This module never reads the environment: the CLI points it at $XDG_CACHE_HOME.
_cache_dir: Path | None = None


def set_cache_dir(path: str | Path | None) -> None:
    """Generate into ``path`` when no ``out_dir`` is given (None: back to ~/.cache/moegraph/generated)."""
    global _cache_dir
    _cache_dir = None if path is None else Path(path)


def default_cache_dir() -> Path:
    """Where generated code goes when no ``out_dir`` is given (see ``set_cache_dir``)."""
    return _cache_dir if _cache_dir is not None else Path.home() / ".cache" / "moegraph" / "generated"


def read_text_or_none(path: Path) -> str | None:
    """A generated file's text; None when it is missing, unreadable or not UTF-8 (it is then rebuilt)."""
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


#: the fix a failed write of generated code names
OUT_DIR_FIX = "choose a writable directory with -o/out_dir (or moegraph.codegen.set_cache_dir)"


def write_atomic(path: Path, source: str, fix: str = OUT_DIR_FIX, what: str = "generated code") -> bool:
    """Write ``source`` to ``path`` unless it already holds exactly that; return whether it wrote.

    Written as every moegraph output is (``fileio.write_atomically``: a new file beside ``path`` renamed over
    it, so a reader never sees half a file); a failure is a CodegenError naming ``what`` and ending with ``fix``.
    """
    if read_text_or_none(path) == source:
        return False
    write_atomically(path, lambda tmp: tmp.write_text(source, encoding="utf-8"), what, CodegenError, fix)
    return True


def write_source(spec: MoESpec, out_dir: str | Path, backend: str = "torch") -> Generated:
    """Render and write the layer source into ``out_dir``, only if its content changed."""
    source = render(spec, backend)
    digest = source_hash(source)
    out = Path(out_dir)
    name = f"moe_{re.sub(r'[^0-9a-zA-Z]+', '_', spec.name)[:80]}_{spec.short_hash}_{backend}.py"
    path = out / name
    if out.exists() and not out.is_dir():
        raise CodegenError(f"cannot write generated code to {out}: it is a file, not a directory; choose a "
                           "directory with -o/out_dir")
    written = write_atomic(path, source)
    return Generated(path, source, digest, written=written)


_MODULES: dict[str, ModuleType] = {}


def load_module(gen: Generated) -> ModuleType:
    """The module of a generated source, cached by the sha256 of its content.

    The module is built from ``gen.source`` itself (the text whose hash is ``gen.digest``), never from
    bytecode or from whatever the file holds now: a stale or corrupt ``.pyc`` or a hand-edited file
    cannot change what runs. A file that no longer holds the source is rewritten (for tools that read
    it, such as tracebacks and Triton's source lookup).
    """
    mod = _MODULES.get(gen.digest)
    if mod is not None:
        return mod
    if source_hash(gen.source) != gen.digest:
        raise CodegenError(f"generated source for {gen.path} does not match its hash; regenerate it")
    write_atomic(gen.path, gen.source)
    mod = import_generated(gen.path, f"moegraph_generated_{gen.digest[:16]}", "generated file", gen.source)
    _MODULES[gen.digest] = mod
    return mod


def import_generated(path: Path, mod_name: str, what: str, source: str) -> ModuleType:
    """Execute verified generated ``source`` as module ``mod_name`` (its file is ``path``).

    The source text is compiled here, so no bytecode cache is read or written; the line cache is
    pointed at the same text so that tracebacks and ``inspect.getsource`` (Triton's ``@jit``) see
    exactly what runs. A failure is a CodegenError.
    """
    try:
        code = compile(source, str(path), "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        raise CodegenError(f"{what} {path} does not compile: {exc}") from None
    mod = ModuleType(mod_name)
    mod.__file__ = str(path)
    linecache.cache[str(path)] = (len(source), None, source.splitlines(True), str(path))
    sys.modules[mod_name] = mod
    try:
        exec(code, mod.__dict__)  # noqa: S102 - moegraph's own generated source, checked by check_module
    except Exception as exc:  # a generated file that does not import is a moegraph bug
        del sys.modules[mod_name]
        raise CodegenError(f"{what} {path} failed to import: {exc}") from exc
    return mod


def layer_class(spec: MoESpec, backend: str = "torch", out_dir: str | Path | None = None) -> tuple[type, Generated]:
    """Generate (or reuse) the layer class for a spec."""
    gen = write_source(spec, out_dir if out_dir is not None else default_cache_dir(), backend)
    mod = load_module(gen)
    return getattr(mod, class_name(spec)), gen
