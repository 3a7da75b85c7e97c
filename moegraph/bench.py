"""Side-by-side timing of a compiled layer against Hugging Face transformers' DeepseekV3MoE.

Every implementation runs in the same process on the same inputs, interleaved round by round (so
machine noise hits all of them alike); the median of the rounds is reported. Next to the timings we
measure the machine's limit for each size: the time of the same FLOPs as one large matmul (the faster of
torch.mm and a oneDNN matmul with pre-packed weights, the two GEMM paths moegraph can use), and the
time to read the expert weights that the batch touches (a plain sum over them); the larger of the
two is the limit. Ratios, not absolute times, are the result.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .loader import load_spec
from .spec import MoESpec

#: The issue's DeepSeek-V3-shaped layer scaled to a 2-core CPU.
BENCH_SPEC = {
    "name": "deepseek-v3-bench",
    "description": "DeepSeek-V3-shaped layer scaled to a CPU (hidden 1024, 64 experts of 256, top-6, 8 groups keep 4)",
    "moe": {
        "hidden_size": 1024,
        "experts": {"num_experts": 64, "intermediate_size": 256, "activation": "swiglu"},
        "shared_experts": {"count": 1},
        "router": {
            "type": "topk", "top_k": 6, "score": "sigmoid", "normalize": True, "scaling_factor": 2.5,
            "groups": {"num_groups": 8, "topk_groups": 4, "group_score": "sum_topn", "top_n": 2},
            "expert_bias": {"update_rate": 0.001},
        },
    },
}


def hf_incompatibility(spec: MoESpec) -> str | None:
    """Why HF's DeepseekV3MoE cannot stand in for this spec (None when it can)."""
    m, r = spec.moe, spec.moe.router
    if r.type != "topk" or r.score != "sigmoid" or r.topk_order != "score_then_topk":
        return "DeepseekV3MoE routes top-k over sigmoid scores"
    if r.expert_bias is None or r.capacity is not None or r.router_bias or r.jitter:
        return "DeepseekV3MoE has an expert bias, no capacity limit, no router bias and no jitter"
    if r.groups is not None and (r.groups.group_score != "sum_topn" or r.groups.top_n != 2):
        return "DeepseekV3MoE scores groups by the sum of their top-2 experts"
    if m.experts.activation != "swiglu" or m.experts.bias or m.experts.gate_clamp or m.experts.up_clamp:
        return "DeepseekV3MoE experts are plain SwiGLU MLPs"
    if m.shared_experts.count == 0 or m.shared_experts.gate != "none":
        return "DeepseekV3MoE has ungated shared experts"
    if m.shared_experts.intermediate_size not in (None, m.experts.intermediate_size):
        return "DeepseekV3MoE shared experts have the routed experts' size"
    return None


def hf_deepseek_v3_block(spec: MoESpec, implementation: str = "eager", seed: int = 0):
    """A transformers DeepseekV3MoE with the spec's shape and random weights (float32)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    m, r = spec.moe, spec.moe.router
    cfg = DeepseekV3Config(
        hidden_size=m.hidden_size, moe_intermediate_size=m.experts.intermediate_size,
        n_routed_experts=m.experts.num_experts, num_experts_per_tok=r.top_k,
        n_shared_experts=m.shared_experts.count, n_group=r.groups.num_groups if r.groups else 1,
        topk_group=r.groups.topk_groups if r.groups else 1, norm_topk_prob=r.normalize,
        routed_scaling_factor=r.scaling_factor, hidden_act="silu",
    )
    cfg._experts_implementation = implementation
    torch.manual_seed(seed)
    block = DeepseekV3MoE(cfg).float().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_((torch.rand_like(p) * 2 - 1) / p.shape[-1] ** 0.5)
        block.gate.e_score_correction_bias.copy_(torch.rand_like(block.gate.e_score_correction_bias) * 0.1)
    return block


def copy_hf_weights(layer, block) -> None:
    """Copy a DeepseekV3MoE's weights into a compiled layer (same layout, different names)."""
    with torch.no_grad():
        layer.router.weight.copy_(block.gate.weight)
        layer.router.expert_bias.copy_(block.gate.e_score_correction_bias)
        layer.experts.gate_up_proj.copy_(block.experts.gate_up_proj)
        layer.experts.down_proj.copy_(block.experts.down_proj)
        se = block.shared_experts
        layer.shared_experts.gate_up_proj.copy_(torch.cat([se.gate_proj.weight, se.up_proj.weight], 0))
        layer.shared_experts.down_proj.copy_(se.down_proj.weight)


@dataclass
class BenchRow:
    tokens: int
    times: dict[str, float] = field(default_factory=dict)  # seconds, median
    limit_matmul: float = 0.0
    limit_weights: float = 0.0
    strategy: str = ""  # the expert strategy moegraph ran at this size

    @property
    def limit(self) -> float:
        return max(self.limit_matmul, self.limit_weights)


def _median_interleaved(fns: dict[str, Callable[[], object]], rounds: int, inner: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for r in range(rounds):
        # ABBA: every other round runs the implementations in reverse order, so that a drift in the
        # machine's load (or a cache warmed by the previous implementation) favours none of them.
        for name, fn in (list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def _check_close(name: str, out, ref, dtype) -> None:
    """Outputs agree: elementwise in float32; by relative norm in bfloat16, where rounding (and the
    odd near-tie routed differently) moves single elements by more than any elementwise tolerance."""
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        return
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 5e-2, f"{name} differs from moegraph by {err:.3g} (relative norm) in {dtype}"


def _train_step(mod, *inputs):
    """One training step's compute: forward, then backward of a scalar loss into every parameter."""
    for p in mod.parameters():
        p.grad = None
    out = mod(*inputs)
    (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()


def _strategy_used(layer, x, token_ids=None) -> str:
    """Run the layer once (tuning now if this bucket is new) and say which expert strategy ran: the one
    that computed (``strategies.last_ran``), and beside it a pinned strategy that fell back to it (a
    ``native_bf16`` pin in float32 runs ``per_expert``)."""
    from . import strategies

    pin = layer.__dict__.get("expert_strategy")
    strategies._ran(None)
    layer(x, token_ids)
    ran = strategies.last_ran()
    if ran is None:  # no expert op ran (no routed rows)
        return pin or "rule"
    return ran if pin in (None, ran) else f"{ran} (pinned {pin} fell back)"


def _output_and_ids(layer, x, token_ids=None):
    """The layer's output on ``x`` (detached) and its routed expert ids, in one call of its graph
    under the layer's pinned strategy (if any), in the caller's grad mode."""
    from .strategies import pinned

    args = (x, token_ids) if not layer.RECEIVES_ROUTER_STATE else (x, token_ids, layer._router_state(x, None))
    with pinned(layer.__dict__.get("expert_strategy")):
        y, _, ids, *_ = layer.graph()(*args)
    return y.detach(), ids


def _touched_weights(layer, spec: MoESpec, ids) -> list:
    """What reading the touched experts' weights means for a call with routed expert ids ``ids``: each
    touched expert's slice of every [E, ...] tensor of the experts (weights, biases, FP8 scales), and the
    shared experts whole, as tensors ``.sum()`` reads once (FP8, which torch does not sum, as 64-bit words)."""
    E = spec.moe.experts.num_experts
    touched = [e for e in torch.unique(ids).tolist() if 0 <= e < E]
    experts = [*layer.experts.parameters(), *layer.experts.buffers()]
    out = [t[e] for t in experts if t.dim() and t.shape[0] == E for e in touched]
    if spec.moe.shared_experts.count and getattr(layer, "shared_experts", None) is not None:
        out += [*layer.shared_experts.parameters(), *layer.shared_experts.buffers()]
    readable = []
    for t in out:
        t = t.detach()
        if t.is_floating_point() and t.element_size() == 1:
            b = t.contiguous().view(torch.uint8).reshape(-1)
            t = b.view(torch.int64) if b.numel() % 8 == 0 else b
        readable.append(t)
    return readable


def _as_ints(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` as integers of its element width (reading them converts nothing)."""
    kind = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t if not t.is_floating_point() else t.contiguous().view(kind)


def _flat_words(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One contiguous int32 tensor of all the bytes of ``tensors`` (zero-padded to whole words)."""
    flat = torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]) if tensors else \
        torch.zeros(4, dtype=torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 4)])
    return flat.view(torch.int32)


def run_layer_bench(spec: MoESpec | dict | str = BENCH_SPEC, tokens=(1, 16, 128, 2048), rounds: int = 7,
                    with_hf: bool = True, progress: Callable[[str], None] | None = None,
                    dtype: torch.dtype = torch.float32, train: bool = False,
                    expert_strategy: str = "auto") -> list[BenchRow]:
    """Time the compiled layer (and HF eager / grouped_mm) on ``tokens`` x D inputs in ``dtype``.

    Forward in eval mode, or (``train``) a training step: forward and backward in train mode. Before
    the timed rounds of a size, each implementation runs once: that call is where the expert
    strategy is tuned (if the size is new), so no timed round ever includes tuning. A layer with hash
    routing gets random token ids.
    """
    from .compiler import compile

    spec = load_spec(spec)
    m = spec.moe
    layer = compile(spec, dtype=dtype, expert_strategy=expert_strategy).train(train)
    impls: dict[str, Callable] = {}
    if with_hf:
        hf_eager = hf_deepseek_v3_block(spec, "eager")
        hf_gmm = hf_deepseek_v3_block(spec, "grouped_mm")
        hf_gmm.load_state_dict(hf_eager.state_dict())
        copy_hf_weights(layer, hf_eager)
        for block in (hf_eager, hf_gmm):
            block.to(dtype).train(train)
            block.gate.float()  # HF's router (weight and bias) stays float32, as moegraph's does
        impls = {"hf_eager": hf_eager, "hf_grouped_mm": hf_gmm}
    impls = {"moegraph": layer, **impls}
    D, F, K = m.hidden_size, m.experts.intermediate_size, m.top_k
    Fs = m.shared_experts.count * m.shared_intermediate_size
    H = 2 if m.experts.gated else 1
    rows = []
    g = torch.Generator().manual_seed(0)
    for T in tokens:
        if progress:
            progress(f"{T} tokens")
        x = torch.randn(1, T, D, generator=g).to(dtype)
        tid = torch.randint(0, max(layer.HASH_VOCAB, 1), (1, T), generator=g) if layer.NEEDS_TOKEN_IDS else None
        inputs = {name: (x, tid) if name == "moegraph" else (x,) for name in impls}
        ctx = torch.enable_grad() if train else torch.inference_mode()
        with ctx:
            # A training call tunes (and reports) the training forms, an eval call the inference ones.
            strategy = _strategy_used(layer, x, tid)
            # The reference output and the routed ids from the call that is timed (a training call
            # in train mode: a no_grad call there would tune the inference forms, never timed here).
            ref, ids = _output_and_ids(layer, x, tid)
            with torch.no_grad():
                for name, mod in impls.items():
                    if name != "moegraph":
                        _check_close(name, mod(x), ref, dtype)
                # The machine's limit for this size.
                w_touched = _touched_weights(layer, spec, ids)
            rows_mm = T * (K + (Fs // F if Fs else 0))
            a = torch.randn(rows_mm, D, generator=g).to(dtype)
            b = torch.randn(D, (H + 1) * F, generator=g).to(dtype)
            if train:
                fns = {name: (lambda mod=mod, i=inputs[name]: _train_step(mod, *i)) for name, mod in impls.items()}
                _train_step(layer, x, tid)  # tunes the backward's strategy before the timed rounds
            else:
                fns = {name: (lambda mod=mod, i=inputs[name]: mod(*i)) for name, mod in impls.items()}
            # A training step's GEMMs are three times the forward's (input and weight gradients).
            mm_reps = 3 if train else 1
            fns["_matmul"] = lambda: [torch.mm(a, b) for _ in range(mm_reps)]
            from .ops import prepack_supported

            if prepack_supported(b) and not train:  # the limit uses the faster GEMM library, as moegraph may
                b_packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), rows_mm)
                fns["_matmul_onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b_packed, None, "none", [], "")
            # Reading the bytes, three ways (the fastest is the floor): a float sum per tensor widens every
            # bfloat16 element and adds, which can take longer than the read itself (the layer beat such a
            # "limit", 0.95x); the max of the same bytes viewed as integers of their width converts nothing; and
            # one call over a contiguous copy of them pays no per-tensor call (a hundred calls of a parallel
            # reduction, each starting its threads: the float32 decode kernel beat the other two at 16 tokens).
            w_ints = [_as_ints(w) for w in w_touched]
            w_flat = _flat_words(w_ints)
            fns["_weights"] = lambda: [w.sum() for w in w_touched]
            fns["_weights_int"] = lambda: [w.max() for w in w_ints]
            fns["_weights_flat"] = lambda: w_flat.max()
            inner = max(1, min(50, (256 if train else 2048) // max(T, 1)))
            with torch.no_grad() if not train else contextlib.nullcontext():
                t = _median_interleaved(fns, rounds, inner)
        matmul = min(t["_matmul"], t.get("_matmul_onednn", float("inf")))
        weights = min(t["_weights"], t["_weights_int"], t["_weights_flat"])
        row = BenchRow(T, {k: v for k, v in t.items() if not k.startswith("_")}, matmul, weights, strategy)
        rows.append(row)
    return rows


def machine_line(dtype: torch.dtype, train: bool) -> str:
    """What the figures were measured on: CPU model, threads, torch version, dtype and mode."""
    from .tuning import cpu_model

    mode = "training step (forward + backward, train mode)" if train else "forward, eval"
    return (f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {mode}, "
            f"{str(dtype).replace('torch.', '')}")


def format_rows(rows: list[BenchRow]) -> list[list[str]]:
    """Table cells: tokens, each implementation's time, speed-ups vs HF, distance to the limit, strategy."""
    out = []
    for r in rows:
        cells = [str(r.tokens)]
        for name in r.times:
            cells.append(f"{r.times[name] * 1e3:.3f}")
        cells.append(f"{r.limit * 1e3:.3f}")
        mg = r.times["moegraph"]
        hf = [v for k, v in r.times.items() if k.startswith("hf_")]
        cells.append(f"{min(hf) / mg:.2f}x" if hf else "-")
        cells.append(f"{mg / r.limit:.2f}x")
        cells.append(r.strategy)
        out.append(cells)
    return out
