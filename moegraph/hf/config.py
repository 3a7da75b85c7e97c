"""Config only: read an HF config.json and build the spec of the model it describes."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import InputError, UnsupportedBlock, short_repr
from ..fileio import check_input
from ..semantics.activations import ACTIVATIONS, OTHER_NAMES
from ..spec import ExpertsSpec, MoELayerSpec, ModelSpec, MoESpec, TopKRouter
from .anatomy import BlockAnatomy, inspect_block, is_hf_moe_block
from .assemble import _dtype_name, build_spec
from .model_section import _layer_types
from .probe import probe_block
from .quant import quantization_section
from .routing import Routing, declared_routing, identify_routing, read_extra_choices
from .vocab import (
    _EXPERT_F,
    _NUM_EXPERTS,
    _SCORE_FNS,
    _SHARED_COUNT,
    _SHARED_F,
    _TOP_K,
    _attr,
    _family,
    _text_config,
)


#: the largest config.json read (a model's config is a few kilobytes)
MAX_CONFIG_BYTES = 16 << 20


def load_hf_config(path: str | Path) -> Any:
    """An HF config from a config.json file (or a folder holding one).

    Known model types become their transformers config class; unknown ones a plain namespace.
    """
    p = Path(path)
    check_input(p, "Hugging Face config (config.json)", InputError, MAX_CONFIG_BYTES)
    if p.is_dir():
        p = p / "config.json"
        check_input(p, "Hugging Face config (config.json)", InputError, MAX_CONFIG_BYTES)
    try:
        raw = json.loads(p.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        if p != Path(path):  # a folder without config.json (a checkpoint's shards only, a parent folder)
            raise InputError(f"{path}: the folder holds no config.json; pass the model folder that holds it (as "
                             "downloaded from the Hub), or the path of its config.json") from None
        raise InputError(f"{path}: no such file; pass an HF config.json or a folder holding one") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{p}: not a readable JSON config: {exc}") from None
    except RecursionError:
        raise InputError(f"{p}: nested too deeply to be a Hugging Face config") from None
    if not isinstance(raw, dict):
        raise InputError(f"{p}: expected a JSON object, got {type(raw).__name__}")
    mt = raw.get("model_type")
    try:
        from transformers import AutoConfig

        if mt:
            kwargs = {k: v for k, v in raw.items() if k != "model_type"}
            if "torch_dtype" in kwargs:  # the older spelling, still common in config.json files
                kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
            cfg = AutoConfig.for_model(mt, **kwargs)
            cfg._name_or_path = str(p)
            return cfg
    except ImportError:
        pass
    except Exception as exc:  # noqa: BLE001 - transformers raises several kinds for a bad config
        if "Unrecognized" not in str(exc) and "model_type" not in str(exc):
            raise InputError(f"{p}: transformers cannot read this {mt} config: {exc}") from None
    from types import SimpleNamespace

    ns = SimpleNamespace(**raw)
    ns._name_or_path = str(p)
    return ns


#: the config's sizes checked before anything is built from them: (its names for the size, the spec field that holds
#: it, what it is); the bounds are the spec's own (a config beyond them hung building a billion layers, or
#: allocated terabytes probing a trillion experts)
_SIZES = (
    (("num_hidden_layers",), ModelSpec, "num_layers", "decoder layers"),
    (_NUM_EXPERTS, ExpertsSpec, "num_experts", "routed experts"),
    (_TOP_K, TopKRouter, "top_k", "experts per token"),
    (("hidden_size",), MoELayerSpec, "hidden_size", "the hidden size"),
    (_EXPERT_F, ExpertsSpec, "intermediate_size", "the expert size"),
)


def _spec_bound(model: type, field: str) -> int:
    """The largest value the spec accepts in ``model.field`` (its pydantic ``le``)."""
    return next(m.le for m in model.model_fields[field].metadata if getattr(m, "le", None) is not None)


def _named(cfg: Any, names: tuple[str, ...]) -> tuple[str | None, Any]:
    """(name, value) of the first of ``names`` the config sets (as ``vocab._attr`` reads it), or (None, None); a
    name the config refuses to read globally (a per-layer attribute, as dots3's) counts as not set."""
    for n in names:
        try:
            value = getattr(cfg, n, None)
        except Exception:  # noqa: BLE001 - transformers raises its own kinds for attributes it will not give
            continue
        if value is not None:
            return n, value
    return None, None


def check_config_sizes(config: Any) -> None:
    """``InputError`` naming the config file, the field and the spec's bound when a size of the model ``config``
    describes (layers, experts, top-k, hidden and expert size) is no whole number within the bounds of the spec
    field that holds it, or the top-k is more than the experts a token can choose; before any block is built."""
    cfg = _text_config(config)
    src = getattr(config, "_name_or_path", "") or f"the {_family(cfg)} config"
    found = {}
    for names, model, field, what in _SIZES:
        key, value = _named(cfg, names)
        if key is None or not isinstance(value, (int, float)):
            continue
        hi = _spec_bound(model, field)
        if isinstance(value, bool) or not float(value).is_integer() or not 1 <= value <= hi:
            raise InputError(f"{src}: {key} is {short_repr(value)}; a moegraph spec holds {what} as a whole number "
                             f"from 1 to "
                             f"{hi} ({model.__name__}.{field}): fix {key} in the config")
        found[field] = (key, int(value))
    if "top_k" in found and "num_experts" in found:
        (k_key, k), (e_key, e) = found["top_k"], found["num_experts"]
        e += getattr(cfg, "zero_expert_num", None) or 0  # LongCat-Flash: choices of experts that return zero
        if k > e:
            raise InputError(f"{src}: {k_key} is {k}, more than the {e} experts ({e_key}) a token can choose from: "
                             f"give {k_key} at most {e} in the config")


def _meta_block(cfg: Any) -> tuple[nn.Module | None, str]:
    """The first MoE block of the model ``cfg`` describes, built on the meta device (no memory)."""
    blocks, why = _meta_blocks(cfg, first_only=True)
    return (blocks[0][1] if blocks else None), why


def _meta_blocks(cfg: Any, first_only: bool = False) -> tuple[list[tuple[str, nn.Module]], str]:
    """(path, block) of the MoE blocks of the model ``cfg`` describes, built on the meta device (no memory);
    ``first_only``: a model cut after its first MoE layer is enough."""
    try:
        import transformers
        from transformers import AutoModel, AutoModelForCausalLM
    except ImportError:
        return None, "transformers is not installed"
    if not hasattr(cfg, "to_dict"):
        return None, f"transformers does not know model type {short_repr(_family(cfg))}"
    types = _layer_types(_text_config(cfg))
    first = types.index("moe") if types and "moe" in types else None
    attempts = []
    small = copy.deepcopy(cfg)
    tc = _text_config(small)
    n = getattr(tc, "num_hidden_layers", None)
    if first_only and first is not None and isinstance(n, int) and n > first + 1:
        tc.num_hidden_layers = first + 1
        for key, val in list(vars(tc).items()):
            if isinstance(val, list) and len(val) == n:
                setattr(tc, key, val[: first + 1])
        attempts.append(small)
    attempts.append(cfg)
    last = ""
    prev = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        for c in attempts:
            for auto in (AutoModelForCausalLM, AutoModel):
                try:
                    with torch.device("meta"):
                        model = auto.from_config(c)
                except Exception as exc:  # noqa: BLE001 - try the next way of building it
                    last = f"building the model failed ({type(exc).__name__}: {exc})"
                    continue
                found = [(p, m) for p, m in model.named_modules() if is_hf_moe_block(m)]
                if found:
                    return found[:1] if first_only else found, ""
                other = [type(m).__name__ for _, m in model.named_modules()
                         if any("expert" in n.lower() for n, _ in m.named_children())]
                last = (f"its MoE blocks ({other[0]}) do not hold experts in the transformers v5 layout (3-D "
                        "gate_up_proj/up_proj and down_proj)" if other else "the model it builds has no MoE block")
    finally:
        transformers.logging.set_verbosity(prev)
    return [], last


def _kinds(blocks: list[tuple[str, nn.Module]]) -> list[tuple[list[str], nn.Module]]:
    """The blocks grouped by structure (class, forward arguments, named tensor shapes), first seen first: blocks
    of one group run the same code on the same config, so one spec describes them (DeepSeek-V4's hash layers,
    which hold a token table, form a group apart from its top-k layers)."""
    from .probe import forward_args

    groups: dict[tuple, tuple[list[str], nn.Module]] = {}
    for path, b in blocks:
        key = (type(b), tuple(forward_args(b)),
               tuple((n, tuple(t.shape), t.dtype) for n, t in list(b.named_parameters()) + list(b.named_buffers())))
        groups.setdefault(key, ([], b))[0].append(path)
    return list(groups.values())


def _known_to_transformers(cfg: Any) -> bool:
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:
        return False
    return hasattr(cfg, "to_dict") and getattr(cfg, "model_type", None) in CONFIG_MAPPING


def _declared_only(cfg: Any) -> tuple[BlockAnatomy, Routing, list[str]]:
    """Anatomy and routing from config attributes alone (when no block can be built to probe)."""
    fam = _family(cfg)
    E = _attr(cfg, _NUM_EXPERTS)
    K = _attr(cfg, _TOP_K)
    D = getattr(cfg, "hidden_size", None)
    Fh = _attr(cfg, _EXPERT_F) or getattr(cfg, "intermediate_size", None)
    if not all(isinstance(v, int) and v > 0 for v in (E, K, D, Fh)):
        raise UnsupportedBlock("the config lacks the expert count, top-k, hidden or expert size (looked for "
                               f"{'/'.join(_NUM_EXPERTS)}, {'/'.join(_TOP_K)}, hidden_size, {'/'.join(_EXPERT_F)})", fam)
    act = getattr(cfg, "hidden_act", "silu")
    act = OTHER_NAMES.get(act, act)  # an elementwise activation of the table, or None (read from the block instead)
    act = act if act in ACTIVATIONS and not ACTIVATIONS[act].gated else None
    shared_count = _attr(cfg, _SHARED_COUNT) or 0
    shared_f = _attr(cfg, _SHARED_F)
    S = 0
    if isinstance(shared_f, int) and shared_f > 0:
        S = shared_f
    elif isinstance(shared_count, int) and shared_count > 0:
        S = shared_count * Fh
    anat = BlockAnatomy(
        block_class=fam, experts_name="experts", num_experts=E, hidden_size=D, intermediate_size=Fh, gated=act != "relu2",
        transposed=False, interleaved=False, expert_bias_terms=False, activation_fn=act, router_weight_name="gate.weight",
        router_bias_name=None, expert_bias_name=None, shared_names=("shared_experts",) if S else (),
        shared_layout="gate_up_down" if S else None, shared_intermediate=S,
    )
    dec = declared_routing(cfg)
    score = dec.score or "softmax"
    if score not in _SCORE_FNS:
        raise UnsupportedBlock(f"scoring function {short_repr(dec.score)} is not one the spec knows", fam)
    groups = None
    if dec.groups and not dec.greedy and E % dec.groups[0] == 0:
        groups = (dec.groups[0], dec.groups[1], dec.group_method or "max", 2)
    r = Routing(top_k=K, score=score, normalize=bool(dec.normalize), scaling_factor=dec.scaling or 1.0, groups=groups)
    return anat, r, ["routing read from config attributes only (transformers could not build the block to check it)"]


def _shared_quantized(config: Any) -> bool:
    """Whether a fine-grained FP8 config quantizes the shared experts (unless it names them unconverted)."""
    q = getattr(config, "quantization_config", None)
    skip = (q.get("modules_to_not_convert") if isinstance(q, dict) else getattr(q, "modules_to_not_convert", None)) or ()
    return not any("shared_expert" in str(m) for m in skip)


def spec_from_hf_config(config: Any, *, name: str | None = None, probe: bool = True) -> MoESpec:
    """The spec of the model an HF config describes: MoE layer (checked on a meta-built block) + model section.

    With ``probe`` (default) the first MoE block is built on the meta device and read like
    ``from_hf`` reads a real block (only its router is materialised, with random weights), so the
    routing is the block's, not a guess from attribute names. Without transformers support for the
    model type, the config attributes alone are used (noted in the spec's description).
    """
    if isinstance(config, (str, Path)):
        config = load_hf_config(config)
    check_config_sizes(config)
    block, why = _meta_block(config) if probe else (None, "probing disabled")
    if block is not None:
        blocks, _ = _meta_blocks(config)
        kinds = _kinds(blocks)
        if len(kinds) > 1:
            specs = [_spec_of(config, b, name, probe, "") for _, b in kinds]
            if len({s.hash() for s in specs}) > 1:
                listed = "; ".join(f"{', '.join(paths)}: {s.description}" for (paths, _), s in zip(kinds, specs))
                raise UnsupportedBlock(
                    f"its MoE layers are of {len(kinds)} kinds ({listed}); one spec describes one kind: "
                    "moegraph.hf.layer_specs_from_hf_config gives one spec per kind with the layers of each",
                    _family(_text_config(config)))
    return _spec_of(config, block, name, probe, why)


def layer_specs_from_hf_config(config: Any, *, name: str | None = None) -> list[tuple[list[str], MoESpec]]:
    """One spec per kind of MoE layer of the model an HF config describes, with the module paths of the layers of
    each kind, first layer first (DeepSeek-V4: its hash layers and its top-k layers). Every block is built on
    the meta device and read like ``spec_from_hf_config`` reads the first one; blocks of one structure share
    their spec. Kinds after the first get ``-kind<i>`` after the spec name."""
    if isinstance(config, (str, Path)):
        config = load_hf_config(config)
    check_config_sizes(config)
    blocks, why = _meta_blocks(config)
    if not blocks:
        raise UnsupportedBlock(f"no MoE block could be built from it: {why}", _family(_text_config(config)))
    out = []
    for i, (paths, b) in enumerate(_kinds(blocks)):
        spec = _spec_of(config, b, name, True, "")
        if i:
            spec = spec.model_copy(update={"name": f"{spec.name}-kind{i}"})
        out.append((paths, spec))
    return out


def _spec_of(config: Any, block: nn.Module | None, name: str | None, probe: bool, why: str) -> MoESpec:
    """The spec of one (meta-built) block of the model ``config`` describes, or of its attributes alone."""
    cfg = _text_config(config)
    notes: list[str] = []
    if block is not None:
        anat = inspect_block(block, cfg)
        probed = probe_block(block, anat)
        routing, rnotes = identify_routing(probed, cfg, anat.block_class)
        anat = read_extra_choices(anat, probed, routing)
        notes += rnotes
    elif probe and _known_to_transformers(config):
        # transformers implements this family, so its code (not its attribute names) is the
        # reference; a block we cannot build or read is refused rather than guessed from the config.
        raise UnsupportedBlock(f"transformers implements it but {why}; pass --no-probe to read the config "
                               "attributes alone (unchecked)", _family(cfg))
    else:
        anat, routing, dnotes = _declared_only(cfg)
        notes += dnotes + ([why] if why else [])
    spec = build_spec(anat, routing, cfg, _dtype_name(cfg), notes, name,
                      quantization=quantization_section(config, shared=_shared_quantized(config)))
    if notes:
        spec = spec.model_copy(update={"description": spec.description + "; notes: " + "; ".join(notes)})
    return spec
