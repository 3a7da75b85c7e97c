"""Public entry points for a block: read it (anatomy, probed routing, spec), compile it, compare."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import fp8
from ..errors import UnsupportedBlock
from ..semantics import torch_dtype
from ..spec import MoESpec
from .quant import block_scales, is_fp8_block, quantization_section, reference_block, shared_is_fp8
from .anatomy import BlockAnatomy, _gate_constants, _named_tensors, inspect_block
from .assemble import _dtype_name, build_spec
from .probe import forward_args, probe_block, token_vocab
from .routing import Routing, identify_routing, read_extra_choices
from .train_mode import PendingTrainingWarning, dropout_note
from .vocab import DTYPE_NAMES, _attr, _text_config
from .weights import hf_weights, load_hf_weights


@dataclass
class HFImport:
    """How a block was read: its anatomy, routing, the spec and notes (attached as ``layer.hf_import``)."""

    spec: MoESpec
    anatomy: BlockAnatomy
    routing: Routing
    output_kind: tuple[str, ...]
    notes: list[str]
    max_abs_diff: float | None = None
    token_arg: str | None = None  # the block's forward argument carrying token ids (used or ignored per the spec)
    flat_output: bool = False  # the block returns [tokens, D] for a [B, S, D] input
    flattened: bool = False  # the block returns its output and router logits flattened to 1-D (Ernie 4.5 VL)
    state_arg: str | None = None  # the block's forward argument carrying the previous layer's router state (Zaya)
    #: what the block does in train() mode that the layer does not (dropout, router jitter): also in ``notes``
    training: list[str] = dataclasses.field(default_factory=list)


def _find_config(block: nn.Module) -> Any:
    for m in (block, *block.children()):
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            return cfg
    return None


def _expert_tensor(block: nn.Module, anat: BlockAnatomy) -> torch.Tensor:
    """One of the block's expert weights (any layout): their dtype and device are the block's."""
    return next(getattr(block, anat.experts_name).parameters())


def _block_dtype(block: nn.Module, anat: BlockAnatomy, cfg: Any = None) -> torch.dtype:
    if is_fp8_block(block, anat):  # FP8 experts: the layer computes in the model's dtype
        return torch_dtype(_dtype_name(cfg, "bfloat16")) if cfg is not None else torch.bfloat16
    return _expert_tensor(block, anat).dtype


def _quantization(block: nn.Module, anat: BlockAnatomy, cfg: Any) -> dict | None:
    """moe.quantization of a block with FP8 experts (from its config, else from the experts themselves)."""
    if not is_fp8_block(block, anat):
        return None
    shared = shared_is_fp8(block, anat)
    section = quantization_section(cfg, shared=shared) if cfg is not None else None
    if section is None:
        bs = getattr(getattr(block, anat.experts_name), "block_size", None) or (128, 128)
        fmt = "fp8_e5m2" if getattr(block, anat.experts_name).down_proj.dtype == torch.float8_e5m2 else "fp8_e4m3"
        section = {"format": fmt, "weight_block": list(bs), "activation_tile": [1, bs[1]], "shared_experts": shared}
    return section


def check_target(block: nn.Module, anat: BlockAnatomy, layer: nn.Module) -> tuple[nn.Module, float]:
    """What a compiled layer is compared with, and the relative tolerance (to the output's scale).

    transformers' FP8 experts run on CUDA kernels only, so an FP8 block is checked against a copy of
    that one block dequantized by transformers' own dequantizer, within the error FP8 activations
    imply (4u, ``moegraph.fp8.rounding_bound``); any other block against itself.
    """
    if is_fp8_block(block, anat):
        return reference_block(block, anat, layer.compute_dtype), 4 * fp8.rounding_bound(layer.FP8["format"])[0]
    # (a layer compiled in another dtype than the block's: the tolerance of the lower precision of the two)
    return block, max(tolerance(layer.compute_dtype), tolerance(_expert_tensor(block, anat).dtype))


def read_block(block: nn.Module, config: Any = None, *, name: str | None = None, with_model: bool = False
               ) -> HFImport:
    """Anatomy + probed routing + spec of an HF MoE block (no compilation, no weights copied)."""
    config = config if config is not None else _find_config(block)
    cfg = _text_config(config) if config is not None else None
    anat = inspect_block(block, cfg)
    probe = probe_block(block, anat)
    anat = probe.anatomy or anat  # (two norms beside the experts: which is the experts' input norm, read by the probe)
    routing, notes = identify_routing(probe, cfg, anat.block_class)
    anat = read_extra_choices(anat, probe, routing)
    anat = _routing_tensors(anat, routing, probe)
    dtype = DTYPE_NAMES.get(_block_dtype(block, anat, cfg))
    if dtype is None:
        raise UnsupportedBlock(f"its expert weights are {_block_dtype(block, anat, cfg)}; the spec supports float32, "
                               "float16, bfloat16 and block-scaled FP8", anat.block_class)
    notes = list(anat.notes) + notes
    tensors = dict(_named_tensors(block))
    notes += [f"the learned scalar {n} is read at its value (a constant of the spec); training it is not reproduced"
              for n in anat.unexplained if n in tensors and tensors[n].numel() == 1]
    jitter = _attr(cfg, ("router_jitter_noise", "input_jitter_noise", "moe_jitter_eps")) if cfg is not None else None
    if not isinstance(jitter, (int, float)) or jitter <= 0:  # a block without its config: its router's own
        jitter = next(iter(_gate_constants(block, "jitter")), None)
    training = [dropout_note(block)]
    if isinstance(jitter, (int, float)) and jitter > 0:
        training.append(f"training-time jitter ({jitter}) of the HF block is not reproduced (eval outputs are equal)")
    training = [n for n in training if n]
    notes += training
    spec = build_spec(anat, routing, cfg, dtype, notes, name, with_model=with_model,
                      quantization=_quantization(block, anat, cfg))
    state_arg = None
    if anat.router_network is not None and anat.router_network.state_returned:
        # The router state comes in through the block's one other argument (checked by from_hf's comparison).
        state_arg = next(a for a in forward_args(block) if a != probe.token_arg)
    return HFImport(spec, anat, routing, probe.output_kind, notes, token_arg=probe.token_arg,
                    flat_output=probe.flat_output, flattened=probe.flattened, state_arg=state_arg, training=training)


def _routing_tensors(anat: BlockAnatomy, routing: Routing, probe: Any) -> BlockAnatomy:
    """The anatomy with the router tensors the probe explained: the E-sized tensor as per-expert scales rather than
    a selection bias, the router input's [D] weight and the learned scalar on the routing weights."""
    changes: dict[str, Any] = {}
    if routing.per_expert_scale:
        changes.update(expert_scale_name=anat.expert_bias_name, expert_bias_name=None)
    wname = probe.router_input[2] if probe.router_input is not None else None
    if wname is not None:
        changes.update(router_input_weight_name=wname)
    if probe.weight_scale is not None:
        changes.update(weight_scale_name=probe.weight_scale)
    explained = (wname, probe.weight_scale)
    if any(n is not None for n in explained):
        changes.update(unexplained=tuple(n for n in anat.unexplained if n not in explained))
    return dataclasses.replace(anat, **changes) if changes else anat


def compare(block: nn.Module, layer: nn.Module, *, tokens: int = 16, seed: int = 0,
            token_arg: str | None = None, state_arg: str | None = None) -> tuple[float, float]:
    """(max abs diff, max abs reference) of block vs layer outputs on random tokens, in eval mode.

    Each side gets the same tokens in its own dtype and on its own device (a layer compiled with another
    ``dtype=`` than the block's), and the outputs are compared in float32.
    ``token_arg``: the block's forward argument for token ids; random ids go to it and to the layer.
    ``state_arg``: the one for the previous layer's router state; a layer passing on router state gets a
    random one there (when it adds it), and the states both return are compared too.
    """
    p = next(layer.parameters())
    bdtype, bdevice = _input_dtype(block, layer.compute_dtype), _input_device(block, p.device)
    g = torch.Generator().manual_seed(seed)
    D = layer.HIDDEN
    x = torch.randn(1, tokens, D, generator=g)
    kwargs, tid = {}, None
    if token_arg:
        tid = torch.randint(0, token_vocab(block), (1, tokens), generator=g)
        kwargs[token_arg] = tid.to(bdevice)
        tid = tid.to(p.device)
    state = None
    if layer.RECEIVES_ROUTER_STATE and state_arg:
        state = torch.randn(1, tokens, layer.ROUTER_STATE, generator=g)
        kwargs[state_arg] = state.to(bdevice, bdtype)
        state = state.to(p.device, layer.router.weight.dtype)
    x_block, x = x.to(bdevice, bdtype), x.to(p.device, layer.compute_dtype)
    modes = (block.training, layer.training)
    block.eval()
    layer.eval()
    try:
        with torch.no_grad():
            ref = block(x_block, **kwargs)
            y = layer(x.clone(), tid, router_state=state) if layer.ROUTER_STATE else layer(x.clone(), tid)
            if layer.ROUTER_STATE:  # output and router state compared as one
                ref = torch.cat([ref[0].reshape(-1), ref[1].reshape(-1)])
                y = torch.cat([y[0].reshape(-1), y[1].reshape(-1)])
            ref = ref[0] if isinstance(ref, tuple) else ref
            ref = ref.reshape(y.shape) if ref.numel() == y.numel() else ref  # [tokens, D] blocks (Llama 4)
    finally:
        block.train(modes[0])
        layer.train(modes[1])
    ref = ref.float().to(y.device)
    return float((y.float() - ref).abs().max()), float(ref.abs().max())


def _input_dtype(block: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype a block computes in: that of its largest floating-point tensor (its experts; FP8 bytes aside)."""
    ts = [t for _, t in _named_tensors(block) if t.is_floating_point() and t.element_size() > 1]
    return max(ts, key=lambda t: t.numel()).dtype if ts else default


def _input_device(block: nn.Module, default: torch.device) -> torch.device:
    ts = [t for _, t in _named_tensors(block)]
    return max(ts, key=lambda t: t.numel()).device if ts else default


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a compiled-vs-HF comparison (to the output's scale)."""
    return 1e-4 if dtype == torch.float32 else 3e-2


def from_hf(
    block: nn.Module,
    config: Any = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    backend: str = "torch",
    out_dir: str | Path | None = None,
    share_weights: bool = False,
    check: bool = True,
    name: str | None = None,
) -> nn.Module:
    """Compile the moegraph equivalent of a transformers MoE block, with the block's weights.

    Args:
        block: an MoE block of a transformers model (e.g. ``model.model.layers[1].mlp``).
        config: the model config (default: the block's or its experts' ``config``).
        dtype, device: of the compiled layer (default: those of the block's expert weights).
        share_weights: use the block's own Parameter objects where the layouts agree (no copy;
            training one trains the other). Default: independent copies.
        check: compare the compiled layer with the block on random tokens (eval mode); raise if they differ.
            The layer has no dropout or training-time router noise: a block with either warns (and
            ``hf_import.training`` says what), since in train() mode the two then differ: at once for a block
            in train() mode, else when the layer is first set to train() mode.
    Returns:
        The compiled layer, in the block's mode (train() or eval()); ``layer.hf_import`` (an ``HFImport``) says
        how the block was read.
    Raises:
        UnsupportedBlock: the block uses routing or experts the spec cannot express (with the reason).
    """
    from ..compiler import compile as mg_compile

    if any(t.is_meta for _, t in _named_tensors(block)):
        raise UnsupportedBlock("its weights are on the meta device (not loaded); load the weights first",
                               type(block).__name__)
    _refuse_dtensor(block)
    info = read_block(block, config, name=name)
    anat = info.anatomy
    src_dtype = _block_dtype(block, anat, _find_config(block) if config is None else _text_config(config))
    src_device = _expert_tensor(block, anat).device
    layer = mg_compile(info.spec, backend=backend, out_dir=out_dir, dtype=dtype or src_dtype,
                       device=device or src_device, seed=None)
    # FP8 experts: their bytes and block scales as they are, nothing dequantized.
    load_hf_weights(layer, hf_weights(block, anat) | block_scales(block, anat),
                    share=share_weights and dtype in (None, src_dtype) and device in (None, src_device))
    layer.__dict__["hf_import"] = info
    if check:
        ref, tol = check_target(block, anat, layer)
        diff, scale = compare(ref, layer, token_arg=info.token_arg, state_arg=info.state_arg)
        info.max_abs_diff = diff
        if not diff <= tol * max(scale, 1e-6):
            raise UnsupportedBlock(
                f"the compiled layer differs from the block by {diff:.3g} (output scale {scale:.3g}) although its "
                f"routing matched ({info.routing.describe()}); the expert MLPs compute something else"
                + (f" (parameters not accounted for: {', '.join(anat.unexplained)})" if anat.unexplained else ""),
                anat.block_class,
            )
    # (eval outputs are equal; a training run would change silently): now, or when the layer is set to train
    layer.train(block.training)  # it stands in for the block
    PendingTrainingWarning.attach([layer], {"": (anat.block_class, info.training)} if info.training else {},
                                  "a layer made by moegraph.from_hf", now=block.training)
    return layer


def _refuse_dtensor(block: nn.Module) -> None:
    for n, t in _named_tensors(block):
        if type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor":
            raise UnsupportedBlock(f"weight {n} is a sharded DTensor; gather the block onto one device first "
                                   "(moegraph's expert parallelism takes a plan instead)", type(block).__name__)
