"""Optimise a Hugging Face MoE model end to end: swap its MoE blocks for compiled moegraph layers.

    python examples/optimize_hf_model.py                         # a Qwen2-MoE-shaped model, random weights
    python examples/optimize_hf_model.py --model-type deepseek_v3 --experts 64 --top-k 6
    python examples/optimize_hf_model.py --config path/to/config.json   # sizes from a real config
    python examples/optimize_hf_model.py --small                 # CI size

1. Build the model from its config with random weights (no download), in float32, eval mode.
2. Keep an untouched copy as the baseline, then ``moegraph.optimize(model, verify=True)``: every
   MoE block is read (routing checked on the block itself), compiled, verified and swapped.
3. Print the report, check logits and greedy generation against the baseline, and time the
   optimised model against transformers' eager and grouped_mm experts implementations, side by
   side in this process (interleaved repeats, median) on the same prompts.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

import moegraph
from moegraph.argtypes import nonnegative_int, positive_int


def build_config(args):
    import transformers

    if args.config:
        cfg = moegraph.hf.load_hf_config(args.config)
    else:
        cfg = transformers.AutoConfig.for_model(args.model_type)
    n0 = cfg.num_hidden_layers
    sizes = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, vocab_size=args.vocab,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    moe = dict(num_experts=args.experts, num_local_experts=args.experts, n_routed_experts=args.experts,
               num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_size,
               shared_expert_intermediate_size=2 * args.expert_size, intermediate_size=4 * args.expert_size)
    mla = dict(q_lora_rank=args.hidden // 2, kv_lora_rank=args.hidden // 2, qk_nope_head_dim=16, qk_rope_head_dim=16,
               v_head_dim=16, head_dim=16)
    if args.config is None:
        for k, v in {**sizes, **moe, **(mla if hasattr(cfg, "kv_lora_rank") else {})}.items():
            if hasattr(cfg, k) or k in ("num_experts", "num_local_experts"):
                setattr(cfg, k, v)
        if getattr(cfg, "n_group", None):
            cfg.n_group, cfg.topk_group = 4, 2
        if hasattr(cfg, "first_k_dense_replace"):
            cfg.first_k_dense_replace = 1
        for k, v in list(vars(cfg).items()):  # per-layer lists follow the new layer count
            if isinstance(v, list) and len(v) == n0 and k != "mlp_only_layers":
                setattr(cfg, k, (v * cfg.num_hidden_layers)[: cfg.num_hidden_layers])
    return cfg


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-type", default="qwen2_moe", help="transformers model type (qwen2_moe, deepseek_v3, "
                                                              "mixtral, deepseek_v2, qwen3_moe, olmoe, ...)")
    p.add_argument("--config", default=None, help="an HF config.json to take all sizes from (random weights)")
    sizes = {"hidden": (256, 64), "layers": (4, 2), "experts": (32, 8), "top_k": (4, 2), "expert_size": (256, 32),
             "vocab": (1024, 128), "batch": (4, 2), "seq": (128, 16), "new_tokens": (8, 4),
             "repeats": (5, 2)}  # option: (default, default with --small)
    for name, (full, small) in sizes.items():
        p.add_argument("--" + name.replace("_", "-"), type=positive_int, default=None,
                       help=f"default {full} ({small} with --small)")
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--small", action="store_true", help="tiny sizes for CI (sizes given explicitly are kept)")
    args = p.parse_args()
    for name, (full, small) in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, small if args.small else full)
    if args.top_k > args.experts:
        p.error(f"argument --top-k: at most --experts ({args.experts}), got {args.top_k}")
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from rich.console import Console

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")
    console = Console()

    # Step 1: the model, random weights (routers and selection biases too: HF inits some to zero).
    torch.manual_seed(0)
    cfg = build_config(args)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, t in model.named_parameters():
            if t.dim() == 2 and t.shape[0] == args.experts and "gate" in name or "router" in name:
                t.normal_(0, 0.3)
        for name, t in model.named_buffers():
            if "bias" in name and t.is_floating_point():
                t.normal_(0, 0.05)
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"model: {type(model).__name__} ({cfg.model_type}), {n_params / 1e6:.1f}M parameters, "
                  f"{getattr(cfg, 'num_hidden_layers', '?')} layers, torch threads {torch.get_num_threads()}",
                  highlight=False)

    # Step 2: baseline copy, then optimise in place.
    baseline = copy.deepcopy(model)
    moegraph.optimize(model, verify=True)
    console.print(model.moegraph_report)
    if not model.moegraph_report.swapped:
        console.print("nothing was swapped; see the reasons above")
        return

    # Step 3: same logits and greedy tokens.
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (args.batch, args.seq), generator=g)
    with torch.no_grad():
        ref, out = baseline(ids).logits, model(ids).logits
    diff = float((out - ref).abs().max())
    gen_kw = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    same_tokens = torch.equal(baseline.generate(ids[:1], **gen_kw), model.generate(ids[:1], **gen_kw))
    console.print(f"max |logits diff| = {diff:.2e}; greedy tokens identical: {same_tokens}", highlight=False)
    if not (diff <= 1e-3 * max(1.0, float(ref.abs().max())) and same_tokens):
        raise SystemExit("outputs differ")

    # Step 4: side-by-side timings against transformers' own experts implementations
    # (interleaved repeats, median), all in this process on the same prompts.
    baselines = {"eager": baseline}
    try:
        grouped = copy.deepcopy(baseline)
        grouped.set_experts_implementation("grouped_mm")
        with torch.no_grad():  # fails here if grouped_mm cannot run on this machine
            grouped(ids[:, :4])
        baselines["grouped_mm"] = grouped
    except Exception as exc:  # noqa: BLE001 - an implementation this build lacks is just not compared
        console.print(f"(transformers grouped_mm not compared: {type(exc).__name__})", highlight=False)
    baseline.set_experts_implementation("eager")

    def prefill(m):
        with torch.no_grad():
            m(ids)

    def decode(m):
        m.generate(ids[:1], **gen_kw)

    runners = {**{f"hf {k}": v for k, v in baselines.items()}, "moegraph": model}
    for m in runners.values():  # warm up (graphs traced, caches filled)
        prefill(m)
    from rich.table import Table

    t = Table(title="speed: same process, interleaved repeats, median (speed-up = hf time / moegraph time)")
    t.add_column("step")
    for name in runners:
        t.add_column(name, justify="right")
    t.add_column("vs hf eager", justify="right")
    t.add_column("vs hf grouped_mm", justify="right")
    speedups = {}
    for step, fn in (("prefill", prefill), ("generate", decode)):
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(args.repeats):
            for name, m in runners.items():
                times[name] += timed(lambda m=m, fn=fn: fn(m), 1)
        med = {k: statistics.median(v) for k, v in times.items()}
        vs_eager = med["hf eager"] / med["moegraph"]
        vs_grouped = med.get("hf grouped_mm", float("nan")) / med["moegraph"]
        speedups[step] = vs_eager
        t.add_row(step, *(f"{med[k] * 1e3:.1f} ms" for k in runners), f"{vs_eager:.2f}x", f"{vs_grouped:.2f}x")
    console.print(t)
    print(f"prefill speed-up vs transformers eager: {speedups['prefill']:.2f}x")


if __name__ == "__main__":
    main()
