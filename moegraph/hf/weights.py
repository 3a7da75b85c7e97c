"""A block's weights in the compiled layer's layout, and loading them into a layer."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import UnsupportedBlock
from ..runtime import NORM_WEIGHTS
from .anatomy import BlockAnatomy, flat_glu, get_path, listed_mlps


def hf_weights(block: nn.Module, anat: BlockAnatomy) -> dict[str, Tensor]:
    """The block's weights in the compiled layer's state_dict layout (views where the layout agrees)."""
    ex = getattr(block, anat.experts_name)
    E, Fh = anat.num_experts, anat.intermediate_size
    out: dict[str, Tensor] = {"router.weight": get_path(block, anat.router_weight_name)}
    if anat.router_bias_name:
        out["router.bias"] = get_path(block, anat.router_bias_name)
    if anat.router_network is not None:
        out.update({f"router.mlp.{ours}": get_path(block, path) for ours, path in anat.router_network.params})
    if anat.expert_bias_name:
        out["router.expert_bias"] = get_path(block, anat.expert_bias_name).reshape(-1)
    if anat.expert_scale_name:
        out["router.per_expert_scale"] = get_path(block, anat.expert_scale_name).reshape(-1)
    if anat.router_input_weight_name:
        out["router.input_norm.weight"] = get_path(block, anat.router_input_weight_name)
    if anat.weight_scale_name:
        t = get_path(block, anat.weight_scale_name)  # (a [1] Parameter as it is, so that the swap shares it)
        out["router.weight_scale"] = t if t.dim() == 1 else t.reshape(1)
    if anat.token_table_name:
        out["router.hash_table"] = get_path(block, anat.token_table_name).long()

    def fix_up(t: Tensor) -> Tensor:  # [E, H, D] with gate rows first
        if anat.transposed:
            t = t.transpose(1, 2)
        if anat.interleaved:
            t = torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)
        return t

    def fix_up_bias(t: Tensor) -> Tensor:
        return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1) if anat.interleaved else t

    up_name = "gate_up_proj" if anat.gated else "up_proj"
    if anat.expert_layout == "split":  # JetMoE: input_linear [E, H, D] (gate rows first) and output_linear [E, D, F]
        out[f"experts.{up_name}"] = ex.weight
        out["experts.down_proj"] = get_path(block, anat.split_down_name).weight
    elif anat.expert_layout == "listed":  # E small MLPs: their Linear weights stacked (gate rows, then up rows)
        listed = listed_mlps(ex)
        lin = [[getattr(e, n) for n in listed.ups] for e in listed.experts]
        dn = [getattr(e, listed.down) for e in listed.experts]
        out[f"experts.{up_name}"] = torch.stack([torch.cat([u.weight for u in us], 0) for us in lin])
        out["experts.down_proj"] = torch.stack([d.weight for d in dn])
        if anat.expert_bias_terms:
            def bias(m: nn.Linear) -> Tensor:
                return m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)

            out[f"experts.{up_name}_bias"] = torch.stack([torch.cat([bias(u) for u in us], 0) for us in lin])
            out["experts.down_proj_bias"] = torch.stack([bias(d) for d in dn])
    elif anat.expert_layout == "flat_glu":  # DBRX: w1 (gate), v1 (up), w2 (down transposed), each [E*F, D]
        w1, v1, w2, _, _ = flat_glu(ex)
        D = anat.expert_width or anat.hidden_size
        out["experts.gate_up_proj"] = torch.cat([w1.view(E, Fh, D), v1.view(E, Fh, D)], dim=1)
        out["experts.down_proj"] = w2.view(E, Fh, D).transpose(1, 2)
    else:
        up = getattr(ex, up_name)
        out[f"experts.{up_name}"] = fix_up(up if up.shape[0] == E else up[:E])  # rows beyond E: unused (LongCat)
        down = ex.down_proj
        out["experts.down_proj"] = down.transpose(1, 2) if anat.transposed else down
    if anat.expert_bias_terms and anat.expert_layout != "listed":
        out[f"experts.{up_name}_bias"] = fix_up_bias(getattr(ex, f"{up_name}_bias"))
        out["experts.down_proj_bias"] = ex.down_proj_bias
    if anat.shared_names and anat.shared_layout == "stacked":
        # [n, F, D] gate and up, [n, D, F] down: kept one by one where the router weighs them, else one MLP of
        # hidden n*F (gate rows of every expert, then up rows; down columns in the same order).
        sh = getattr(block, anat.shared_names[0])
        if anat.shared_routed:
            out["shared_experts.gate_up_proj"] = torch.cat([sh.gate_proj, sh.up_proj], dim=1)
            out["shared_experts.down_proj"] = sh.down_proj
        else:
            n, Fs, D = sh.gate_proj.shape
            out["shared_experts.gate_up_proj"] = torch.cat([sh.gate_proj.reshape(n * Fs, D),
                                                            sh.up_proj.reshape(n * Fs, D)], dim=0)
            out["shared_experts.down_proj"] = sh.down_proj.permute(1, 0, 2).reshape(D, n * Fs)
    elif anat.shared_names:
        sh = getattr(block, anat.shared_names[0])
        if anat.shared_layout == "gate_up_down":
            ups = [sh.gate_proj, sh.up_proj]
        elif anat.shared_layout == "fused_gate_up":
            ups = [sh.gate_up_proj]
        else:
            ups = [getattr(sh, "up_proj", None) or sh.fc1]
        dn = getattr(sh, "down_proj", None) or sh.fc2
        out[f"shared_experts.{up_name}"] = ups[0].weight if len(ups) == 1 else torch.cat([u.weight for u in ups], 0)
        out["shared_experts.down_proj"] = dn.weight
        if anat.expert_bias_terms or anat.shared_bias_terms:
            S = anat.shared_intermediate * (2 if anat.gated else 1)
            biases = [u.bias if u.bias is not None else u.weight.new_zeros(u.out_features) for u in ups]
            out[f"shared_experts.{up_name}_bias"] = biases[0] if len(biases) == 1 else torch.cat(biases, 0)
            out["shared_experts.down_proj_bias"] = dn.bias if dn.bias is not None else dn.weight.new_zeros(dn.out_features)
            assert out[f"shared_experts.{up_name}_bias"].numel() == S, "shared bias size mismatch"
        if anat.shared_gate_name:
            out["shared_expert_gate.weight"] = get_path(block, anat.shared_gate_name).weight
    if anat.expert_width:  # the experts' own space: its projections and norm, and the experts' output norm
        out["pre_expert_proj.weight"] = get_path(block, anat.pre_proj_name).weight
        out["post_expert_proj.weight"] = get_path(block, anat.post_proj_name).weight
    if anat.pre_norm_name:
        out["pre_expert_norm.weight"] = get_path(block, anat.pre_norm_name).weight
    if anat.expert_norm_name:
        per_expert = anat.expert_norm is not None and anat.expert_norm.get("per_expert", False)
        out["experts.output_norm_weight" if per_expert else "expert_output_norm.weight"] = get_path(
            block, anat.expert_norm_name).weight
    if anat.shared_norm_name:
        out["shared_expert_norm.weight"] = get_path(block, anat.shared_norm_name).weight
    if anat.output_norm_name:
        out["output_norm.weight"] = get_path(block, anat.output_norm_name).weight
    if anat.output_bias_name:
        out["output.bias"] = get_path(block, anat.output_bias_name)
    if anat.expert_bias_terms is False and anat.shared_bias_terms:
        out["experts.down_proj_bias"] = ex.down_proj.new_zeros(E, anat.expert_width or anat.hidden_size)
        out[f"experts.{up_name}_bias"] = ex.down_proj.new_zeros(E, Fh * (2 if anat.gated else 1))
    return out


def torch_dtype_of(weights: dict[str, Tensor]) -> torch.dtype:
    """The parameter dtype a layer for these weights should have (that of the expert weights)."""
    return weights["experts.down_proj"].dtype


def _wider(a: torch.dtype, b: torch.dtype) -> bool:
    return a.is_floating_point and b.is_floating_point and torch.finfo(a).bits > torch.finfo(b).bits


def load_hf_weights(layer: nn.Module, weights: dict[str, Tensor], *, share: bool = False) -> None:
    """Put ``weights`` into ``layer``: the same Parameter objects where ``share`` and layouts agree, else copies.

    A norm weight the block holds in a wider dtype than the layer's (transformers keeps some families' norms in
    float32 in a bfloat16 model: Ergo's ``_keep_in_fp32_modules_strict``) keeps that dtype: the norm applies its
    weight in float32 either way, so the outputs are the block's, and its state dict gives back the block's values
    (a bfloat16 copy rounded them, and ``save_pretrained`` wrote the rounded ones)."""
    own = dict(layer.named_parameters())
    own.update(dict(layer.named_buffers()))
    missing = [k for k in weights if k not in own]
    assert not missing, f"layer has no {missing}"
    with torch.no_grad():
        for name, src in weights.items():
            dst = own[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise UnsupportedBlock(f"weight {name} has shape {tuple(src.shape)}, the layer expects {tuple(dst.shape)}")
            mod_path, attr = name.rsplit(".", 1)
            mod = get_path(layer, mod_path)
            wider = name in NORM_WEIGHTS and isinstance(dst, nn.Parameter) and _wider(src.dtype, dst.dtype)
            if (share and isinstance(src, nn.Parameter) and isinstance(dst, nn.Parameter)
                    and (src.dtype == dst.dtype or wider) and src.device == dst.device):
                setattr(mod, attr, src)
            elif wider:
                kept = src.detach().to(dst.device, copy=True)
                setattr(mod, attr, nn.Parameter(kept, requires_grad=dst.requires_grad))
            elif share and attr in mod._buffers and src.dtype == dst.dtype and src.device == dst.device \
                    and src.is_contiguous() and not isinstance(src, nn.Parameter):
                mod._buffers[attr] = src
            else:
                dst.copy_(src)
    # (no graph rebuilt: a graph reads the layer's submodules, where every tensor here lives, so it runs the new
    # Parameters and the copied values alike; fx_passes.trace_core)
