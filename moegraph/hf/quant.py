"""FP8 models of transformers' fine-grained FP8 format and DeepSeek-V3's checkpoints.

Three readers, none of which dequantizes the experts:

- ``quantization_section``: a config's ``quantization_config`` (``quant_method: fp8``,
  ``weight_block_size``, ``scale_fmt``, ``activation_scheme``) -> the spec's ``moe.quantization``;
- ``fp8_block_weights``: the scales of a block whose experts are transformers' ``FP8Experts``
  (and, if quantized, ``FP8Linear`` shared experts), next to the FP8 bytes ``hf_weights`` reads;
- ``load_checkpoint``: a state dict in DeepSeek-V3's checkpoint layout (per expert
  ``experts.{e}.gate_proj.weight`` + ``.weight_scale_inv``, ...) or in transformers' fused layout
  (``experts.gate_up_proj`` + ``experts.gate_up_proj_scale_inv``) -> a compiled FP8 layer.

transformers' FP8 experts run only through CUDA kernels; on the CPU ``reference_block`` gives the
block with its weights dequantized by transformers' own dequantizer, for ``from_hf``'s check.

Whole FP8 checkpoints on a machine without a GPU: transformers then dequantizes every weight while
loading (its FP8 quantizer turns ``dequantize`` on), so the experts would reach ``optimize`` as
bfloat16. ``keep_fp8_config`` registers, through transformers' own extension point
(``register_quantizer``), a quantizer that keeps the FP8 modules and bytes on any device;
``moegraph.optimize_pretrained`` loads with it, swaps the MoE blocks (FP8 experts taken as they are)
and then dequantizes only the FP8 weights left outside them (``dequantize_modules``: attention and
dense layers, which transformers' FP8 modules could not run on the CPU).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .. import fp8
from ..errors import InputError, UnsupportedBlock, short_repr
from .anatomy import BlockAnatomy

__all__ = ["quantization_section", "is_fp8_block", "fp8_block_weights", "block_scales", "reference_block",
           "dequantize_modules", "keep_fp8_config", "KEEP_FP8_METHOD", "load_checkpoint"]

#: quant_method of the registered quantizer that keeps FP8 checkpoints in FP8 on any device
KEEP_FP8_METHOD = "moegraph_keep_fp8"


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, Mapping) else getattr(obj, key, default)


def quantization_section(cfg: Any, *, shared: bool = True) -> dict[str, Any] | None:
    """``moe.quantization`` of a config with a fine-grained FP8 ``quantization_config`` (None without one).

    Raises UnsupportedBlock for FP8 schemes the spec cannot express (static activation scales,
    per-tensor weight scales, FP4 experts) and for other quantization methods.
    """
    q = _get(cfg, "quantization_config") if cfg is not None else None
    if q is None:
        return None
    method = str(_get(q, "quant_method", "")).lower().replace("quantizationmethod.", "")
    if method not in ("fp8", KEEP_FP8_METHOD):
        raise UnsupportedBlock(f"its config is quantized with {short_repr(method)}; moegraph reads the fine-grained "
                               "FP8 format "
                               "(quant_method: fp8) only; load the model dequantized instead", "quantization_config")
    if _get(q, "dequantize", False):
        return None  # transformers was asked to dequantize on load: the weights are not FP8
    if str(_get(q, "activation_scheme", "dynamic")).lower() != "dynamic":
        raise UnsupportedBlock("its FP8 config uses static activation scales; moegraph quantizes activations "
                               "dynamically per 1 x 128 tile (activation_scheme: dynamic)", "quantization_config")
    if _get(q, "expert_dtype", "fp8") != "fp8":
        raise UnsupportedBlock(f"its experts are {short_repr(_get(q, 'expert_dtype'))}; moegraph reads FP8 experts "
                               "only",
                               "quantization_config")
    block = _get(q, "weight_block_size")
    if block is None:
        raise UnsupportedBlock("its FP8 config has per-tensor weight scales (no weight_block_size); moegraph reads "
                               "block-scaled FP8 (e.g. weight_block_size: [128, 128])", "quantization_config")
    fmt = str(_get(q, "fmt", "e4m3")).lower()
    if fmt not in ("e4m3", "e5m2"):
        raise UnsupportedBlock(f"its FP8 format is {short_repr(fmt)}; moegraph reads e4m3 and e5m2",
                               "quantization_config")
    return {"format": f"fp8_{fmt}", "weight_block": [int(block[0]), int(block[1])], "activation_tile": [1, int(block[1])],
            "scale_format": "ue8m0" if str(_get(q, "scale_fmt", "float")).lower() == "ue8m0" else "float32",
            "dispatch": "fp8", "shared_experts": shared}


def is_fp8_block(block: nn.Module, anat: BlockAnatomy) -> bool:
    """Whether the block's experts store FP8 weights (any layout: not every family names a down_proj)."""
    return any(fp8.is_fp8(p) for p in getattr(block, anat.experts_name).parameters(recurse=False))


def _shared_linears(block: nn.Module, anat: BlockAnatomy) -> tuple[list[nn.Module], nn.Module] | None:
    if not anat.shared_names or anat.shared_layout != "gate_up_down":
        return None
    sh = getattr(block, anat.shared_names[0])
    return [sh.gate_proj, sh.up_proj], sh.down_proj


def shared_is_fp8(block: nn.Module, anat: BlockAnatomy) -> bool:
    lin = _shared_linears(block, anat)
    return lin is not None and fp8.is_fp8(lin[1].weight)


def _scale(t: Tensor | None, name: str) -> Tensor:
    if t is None:
        raise UnsupportedBlock(f"{name} is FP8 but has no weight_scale_inv", "FP8 block")
    return t.float()  # float8_e8m0fnu (ue8m0) scales become the float32 powers of two they stand for


def fp8_block_weights(block: nn.Module, anat: BlockAnatomy) -> dict[str, Tensor]:
    """The scale tensors of an FP8 block in the compiled layer's state_dict layout."""
    ex = getattr(block, anat.experts_name)
    if anat.transposed or anat.interleaved or anat.expert_bias_terms:
        raise UnsupportedBlock("its FP8 experts are transposed, interleaved or carry biases; moegraph reads "
                               "transformers' FP8Experts layout ([E, out, in] with block scales)", anat.block_class)
    up = "gate_up_proj" if anat.gated else "up_proj"
    out = {f"experts.{up}_scale_inv": _scale(getattr(ex, f"{up}_scale_inv", None), f"experts.{up}"),
           "experts.down_proj_scale_inv": _scale(getattr(ex, "down_proj_scale_inv", None), "experts.down_proj")}
    if shared_is_fp8(block, anat):
        ups, dn = _shared_linears(block, anat)
        out[f"shared_experts.{up}_scale_inv"] = torch.cat(
            [_scale(getattr(u, "weight_scale_inv", None), "shared_experts") for u in ups], 0)
        out["shared_experts.down_proj_scale_inv"] = _scale(getattr(dn, "weight_scale_inv", None), "shared_experts")
    return out


def block_scales(block: nn.Module, anat: BlockAnatomy) -> dict[str, Tensor]:
    """The block scales a block's weights need beside ``hf_weights`` (none unless its experts are FP8)."""
    return fp8_block_weights(block, anat) if is_fp8_block(block, anat) else {}


def reference_block(block: nn.Module, anat: BlockAnatomy, dtype: torch.dtype) -> nn.Module:
    """A copy of one FP8 block whose FP8 weights are dequantized (to ``dtype``) by transformers' own
    dequantizer, so that transformers' modules run it on any device (they then use plain F.linear)."""
    return dequantize_modules(copy.deepcopy(block), dtype)


def _modules_outside(root: nn.Module, keep: tuple[type, ...]):
    """``root``'s modules, not descending into modules of the ``keep`` types."""
    yield root
    for child in root.children():
        if not isinstance(child, keep):
            yield from _modules_outside(child, keep)


def dequantize_modules(root: nn.Module, dtype: torch.dtype, keep: tuple[type, ...] = ()) -> nn.Module:
    """Replace, in place, every FP8 weight of transformers' FP8 modules under ``root`` (not inside modules
    of the ``keep`` types) by its dequantized value (transformers' own dequantizer, ``dtype``); those
    modules then run plain ``F.linear``. Returns ``root``; the number replaced is ``root.moegraph_dequantized``."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    n = 0
    for mod in _modules_outside(root, keep):
        for name, p in list(mod.named_parameters(recurse=False)):
            if fp8.is_fp8(p):
                s_name = name + "_scale_inv" if hasattr(mod, name + "_scale_inv") else "weight_scale_inv"
                scale = getattr(mod, s_name)
                w = _dequantize_fp8_weight(p.data, scale.data.float(), list(getattr(mod, "block_size", None) or (128, 128)),
                                           dtype)
                setattr(mod, name, nn.Parameter(w, requires_grad=False))
                n += 1
                if getattr(getattr(mod, "config", None), "_experts_implementation", "eager") != "eager":
                    # Its grouped forward would call the FP8 kernels: this module alone runs eagerly.
                    mod.config = copy.copy(mod.config)
                    mod.config._experts_implementation = "eager"
    root.moegraph_dequantized = n
    return root


def keep_fp8_config(quantization_config: Any) -> dict[str, Any]:
    """A checkpoint's fine-grained FP8 ``quantization_config`` for the quantizer that keeps FP8 on any device.

    transformers' own FP8 quantizer dequantizes the whole model when no GPU is present; this one (a
    subclass registered under ``KEEP_FP8_METHOD``) differs only in not doing so, and in not asking for
    accelerate, which a CPU load does not use.
    """
    _register_keep_fp8()
    section = quantization_config.to_dict() if hasattr(quantization_config, "to_dict") else dict(quantization_config)
    return {**section, "quant_method": KEEP_FP8_METHOD, "dequantize": False}


@functools.cache
def _register_keep_fp8() -> None:
    from transformers.quantizers.auto import register_quantization_config, register_quantizer
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer
    from transformers.utils.quantization_config import FineGrainedFP8Config

    @register_quantization_config(KEEP_FP8_METHOD)
    class KeepFP8Config(FineGrainedFP8Config):
        def __init__(self, **kwargs):
            kwargs.pop("quant_method", None)
            super().__init__(**kwargs)
            self.quant_method = KEEP_FP8_METHOD

    @register_quantizer(KEEP_FP8_METHOD)
    class KeepFP8Quantizer(FineGrainedFP8HfQuantizer):
        def validate_environment(self, *args, **kwargs):
            return None  # FP8 modules stay FP8 on any device; moegraph runs the experts, the rest is dequantized


# ------------------------------------------------------------------------------------------------
# Checkpoint state dicts
# ------------------------------------------------------------------------------------------------


def _pair(tensors: Mapping[str, Tensor], key: str) -> tuple[Tensor, Tensor]:
    """(FP8 weight, float32 scale_inv) stored under ``key`` (a ``.weight``) and its ``_scale_inv`` sibling."""
    if key not in tensors:
        raise InputError(f"checkpoint has no {key!r}; give the state dict of this layer (and its prefix)")
    w = tensors[key]
    s_key = key[: -len("weight")] + "weight_scale_inv" if key.endswith(".weight") else key + "_scale_inv"
    if not fp8.is_fp8(w):
        raise InputError(f"checkpoint tensor {key!r} is {w.dtype}, not FP8; the layer stores FP8 experts: compile the "
                         "spec without moe.quantization for an unquantized checkpoint")
    if s_key not in tensors:
        raise InputError(f"checkpoint has FP8 {key!r} but no {s_key!r}; FP8 weights need their block scales")
    return w, tensors[s_key].float()


def load_checkpoint(layer: nn.Module, tensors: Mapping[str, Tensor], prefix: str = "") -> None:
    """Load an MoE block's checkpoint tensors into a compiled FP8 layer, FP8 bytes as they are.

    ``tensors``: a state dict (or a safetensors ``safe_open`` handle's tensors) holding, below
    ``prefix`` (e.g. ``"model.layers.3.mlp."``), DeepSeek-V3's per-expert keys
    ``experts.{e}.{gate,up,down}_proj.weight`` with ``...weight_scale_inv``, or transformers' fused
    ``experts.gate_up_proj`` / ``experts.down_proj`` with ``..._scale_inv``; shared experts
    ``shared_experts.{gate,up,down}_proj.weight(_scale_inv)``; the router ``gate.weight`` and
    ``gate.e_score_correction_bias``. Shapes and scales are checked before anything is written.
    """
    if getattr(layer, "FP8", None) is None:
        raise InputError("load_checkpoint loads FP8 checkpoints into layers of FP8 specs; this layer's spec has no "
                         "moe.quantization")
    t = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    E = layer.NUM_EXPERTS
    up = layer.up_proj_name
    new: dict[str, Tensor] = {}
    if "experts.down_proj" in t:  # transformers' fused layout
        for name in (up, "down_proj"):
            new[f"experts.{name}"], new[f"experts.{name}_scale_inv"] = _pair(t, f"experts.{name}")
    else:  # DeepSeek-V3's per-expert layout
        pairs = {n: [_pair(t, f"experts.{e}.{n}.weight") for e in range(E)]
                 for n in (("gate_proj", "up_proj") if layer.GATED else ("up_proj",)) + ("down_proj",)}
        ups = [pairs[n] for n in (("gate_proj", "up_proj") if layer.GATED else ("up_proj",))]
        new[f"experts.{up}"] = torch.stack([torch.cat([p[e][0] for p in ups], 0) for e in range(E)])
        new[f"experts.{up}_scale_inv"] = torch.stack([torch.cat([p[e][1] for p in ups], 0) for e in range(E)])
        new["experts.down_proj"] = torch.stack([w for w, _ in pairs["down_proj"]])
        new["experts.down_proj_scale_inv"] = torch.stack([s for _, s in pairs["down_proj"]])
    if layer.SHARED_INTERMEDIATE:
        names = ("gate_proj", "up_proj") if layer.GATED else ("up_proj",)
        if layer.FP8["shared"]:
            ups = [_pair(t, f"shared_experts.{n}.weight") for n in names]
            new[f"shared_experts.{up}"] = torch.cat([w for w, _ in ups], 0)
            new[f"shared_experts.{up}_scale_inv"] = torch.cat([s for _, s in ups], 0)
            new["shared_experts.down_proj"], new["shared_experts.down_proj_scale_inv"] = _pair(
                t, "shared_experts.down_proj.weight")
        else:
            new[f"shared_experts.{up}"] = torch.cat([t[f"shared_experts.{n}.weight"] for n in names], 0)
            new["shared_experts.down_proj"] = t["shared_experts.down_proj.weight"]
    for src, dst in (("gate.weight", "router.weight"), ("gate.e_score_correction_bias", "router.expert_bias")):
        if src in t:
            new[dst] = t[src]
    own = layer.state_dict()
    block = (layer.FP8["block_out"], layer.FP8["block_in"])
    for name, v in new.items():
        if name not in own or tuple(own[name].shape) != tuple(v.shape):
            want = tuple(own[name].shape) if name in own else "no such tensor"
            raise InputError(f"checkpoint gives {name} of shape {tuple(v.shape)} but the layer has {want}; the "
                             "checkpoint belongs to another spec (sizes, weight_block) or prefix")
        if name.endswith("_scale_inv"):
            fp8.check_scales(name[: -len("_scale_inv")], new[name[: -len("_scale_inv")]], v, block)
        elif fp8.is_fp8(v) and v.dtype != own[name].dtype:
            raise InputError(f"checkpoint gives {name} as {v.dtype} but the spec's format stores {own[name].dtype}; "
                             "set moe.quantization.format to the checkpoint's")
    layer.load_state_dict(new, strict=False)
    layer.invalidate_graphs()
