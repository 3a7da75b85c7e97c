"""FP8 experts in the spec: the presets, memory accounting in ``summary``/``show`` and the planner's
memory check. (Bad quantization sections are cases of tests/test_spec_errors.py.)"""

from __future__ import annotations

import copy

import pytest

from moegraph.errors import PlanInfeasible
from moegraph.loader import load_spec
from moegraph.planner import plan
from moegraph.summary import summarize


def test_fp8_preset_is_deepseek_v3_with_quantized_experts():
    fp8, bf16 = load_spec("deepseek-v3-fp8"), load_spec("deepseek-v3")
    q = fp8.moe.quantization
    assert (q.format, q.weight_block, q.activation_tile, q.scale_format, q.dispatch, q.shared_experts) == (
        "fp8_e4m3", (128, 128), (1, 128), "float32", "fp8", True)
    # Everything but the quantization section is the released model's layer.
    assert fp8.moe.model_copy(update={"quantization": None}) == bf16.moe
    assert fp8.model == bf16.model and fp8.topology == bf16.topology
    tiny = load_spec("deepseek-v3-fp8-tiny")
    assert tiny.moe.quantization == q
    assert tiny.moe.router == load_spec("deepseek-v3-tiny").moe.router


def test_fp8_expert_bytes_by_hand():
    s = summarize(load_spec("deepseek-v3-fp8"))
    D, F, E = 7168, 2048, 256
    weights = 3 * D * F  # one byte each
    scales = (2 * F // 128) * (D // 128) + (D // 128) * (F // 128)  # float32 each
    assert s.routed_expert_bytes == weights + 4 * scales == 44_050_944
    assert s.shared_bytes == weights + 4 * scales  # one shared expert of the same size, quantized too
    assert s.expert_bytes_per_layer == (E + 1) * (weights + 4 * scales)
    assert s.expert_bytes_per_layer_dtype == (E + 1) * 3 * D * F * 2
    ratio = s.expert_bytes_per_layer / s.expert_bytes_per_layer_dtype
    assert ratio <= 0.52 and ratio == pytest.approx(0.5 + 4 * scales / (2 * 3 * D * F))
    # Per GPU: (256 + 32 redundant) / 32 GPUs = 9 routed slots and the shared expert, in each of 58 layers.
    assert s.expert_bytes_per_gpu == 58 * (9 + 1) * (weights + 4 * scales)
    unq = summarize(load_spec("deepseek-v3"))
    assert unq.expert_bytes_per_gpu == 58 * 10 * 3 * D * F * 2
    assert s.expert_bytes_per_gpu / unq.expert_bytes_per_gpu <= 0.52


def test_show_reports_fp8_memory(run_cli):
    out = run_cli("show", "deepseek-v3-fp8").out.replace("\n", " ")
    assert "expert memory per MoE layer (fp8_e4m3 + float32 scales per 128x128 block): 10.54 GiB" in out
    assert "in bfloat16: 21.08 GiB per MoE layer; FP8 takes 0.500x" in out
    assert "expert memory per GPU (32 GPUs, routed slots + shared, all MoE layers): 23.79" in out
    plain = run_cli("show", "deepseek-v3").out.replace("\n", " ")
    assert "expert memory per GPU (32 GPUs, routed slots + shared, all MoE layers): 47.58" in plain


def test_planner_memory_check_counts_fp8_bytes():
    # 9 slots x 58 layers of one routed expert: 21.4 GiB in FP8, 42.8 GiB in bfloat16.
    d = load_spec("deepseek-v3-fp8").to_dict()
    d["topology"]["gpu_memory_gib"] = 30
    plan(load_spec(copy.deepcopy(d)))  # fits in FP8
    d["moe"]["quantization"] = None
    with pytest.raises(PlanInfeasible, match="= 42.8 GiB of expert weights"):
        plan(load_spec(d))


def test_fp8_dtype_advice_names_the_quantization_section():
    # moe.dtype / compile(dtype=) in FP8 point at the section that holds FP8 experts; following the advice loads.
    import torch

    import moegraph
    from moegraph.errors import InputError, SpecError

    d = {"name": "q", "moe": {"hidden_size": 128, "dtype": "float8_e4m3fn", "router": {"top_k": 2},
                              "experts": {"num_experts": 4, "intermediate_size": 128}}}
    with pytest.raises(SpecError) as spec_err:
        load_spec(copy.deepcopy(d))
    with pytest.raises(InputError) as compile_err:
        moegraph.compile("mixtral-tiny", dtype=torch.float8_e4m3fn)
    for err in (spec_err, compile_err):
        assert "moe.quantization" in str(err.value) and "experts.fp8" not in str(err.value)
    d["moe"]["dtype"] = "bfloat16"
    d["moe"]["quantization"] = {"weight_block": [128, 128]}
    assert load_spec(d).moe.quantization.weight_block == (128, 128)
