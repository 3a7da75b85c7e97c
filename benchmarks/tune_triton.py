"""Fill the Triton block-size table for one MoE shape on this GPU.

    python benchmarks/tune_triton.py [--spec deepseek-v3] [--tokens 1 16 128 1024 8192]
                                     [--dtype bfloat16] [--budget-s 900] [--out DIR]
    python benchmarks/tune_triton.py --dry-run      # CPU smoke test under TRITON_INTERPRET=1

For every token count: random top-k routing of that many tokens, then for each row block BLOCK_M
the gate/up GEMM's tiles are tuned first (down at its default), then the down GEMM's tiles with the
best gate/up; the BLOCK_M with the lowest sum wins. Candidates are ordered so that the defaults and
their neighbours come first; the budget is shared evenly by the token counts and, within one, by
its searches; when a search's share runs out the best config found so far is kept.
The table is written to ``moegraph/triton_backend/tuned/`` (or ``--out``) as
``E=..,N=..,device_name=..,dtype=...json``, merged with an existing file, and used by
``moegraph.triton_backend.configs.get_config`` from then on.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import sys
import time

from moegraph.argtypes import positive_float, positive_int


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="deepseek-v3", help="spec preset or file whose expert shape to tune")
    ap.add_argument("--tokens", type=positive_int, nargs="+", default=[1, 16, 64, 128, 256, 1024, 4096, 8192])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--budget-s", type=positive_float, default=900.0, help="stop trying new candidates after this long")
    ap.add_argument("--out", default=None, help="folder for the table (default: the bundled tuned/ folder)")
    ap.add_argument("--block-m", type=positive_int, nargs="+", default=None,
                    help="row-block sizes to try (default: 16..128 up to twice the rows per expert)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under Triton's interpreter")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch

    import moegraph
    from moegraph.triton_backend import configs, kernels

    if args.dry_run:
        spec = moegraph.load_spec("deepseek-v3-tiny")
        device, dtype, tokens = torch.device("cpu"), torch.float32, [1, 33]
        device_name = "dry-run"
        if args.out is None:  # never write a dry-run table into the bundled folder
            import tempfile

            args.out = tempfile.mkdtemp(prefix="moegraph-tune-")
    else:
        if not torch.cuda.is_available():
            sys.exit("tune_triton.py needs a CUDA GPU (or --dry-run for a CPU smoke test)")
        spec = moegraph.load_spec(args.spec)
        device, dtype, tokens = torch.device("cuda"), getattr(torch, args.dtype), args.tokens
        device_name = torch.cuda.get_device_name(device)
    m = spec.moe
    D, F, E, K = m.hidden_size, m.experts.intermediate_size, m.experts.num_experts, m.top_k
    gated = m.experts.gated
    S = m.shared_experts.count * m.shared_intermediate_size
    act = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu"}.get(
        m.experts.activation, m.experts.activation)
    print(f"tuning {spec.name}: D={D} F={F} E={E} K={K} shared={S} {dtype} on {device_name}", flush=True)

    # Step 1: weights (random: only their shapes matter for timing).
    g = torch.Generator(device=device).manual_seed(0)
    H = 2 * F if gated else F

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) / shape[-1] ** 0.5).to(dtype)

    w_up, w_down = rnd(E, H, D), rnd(E, D, F)
    sw_up, sw_down = (rnd(2 * S if gated else S, D), rnd(D, S)) if S else (None, None)

    def bench(fn) -> float:
        """Median milliseconds of fn (CUDA events on GPU; wall clock in the dry run)."""
        if device.type == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=5, rep=30))
        ts = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    elem = torch.tensor([], dtype=dtype).element_size()

    def fits(bm: int, gemm: configs.GemmConfig, b_tiles: int) -> bool:
        # Shared memory per stage: the A tile plus the B tile(s); Hopper allows 227 KiB per block.
        return gemm.num_stages * (bm * gemm.BLOCK_K + b_tiles * gemm.BLOCK_K * gemm.BLOCK_N) * elem <= 220 * 1024

    def candidates(bm: int, default: configs.GemmConfig, b_tiles: int) -> list[configs.GemmConfig]:
        space = [configs.GemmConfig(n, k, gm, w, s) for n, k, gm, w, s in itertools.product(
            (32, 64, 128, 256), (32, 64, 128), (1, 8), (4, 8), (2, 3, 4, 5))]
        space = [c for c in space if fits(bm, c, b_tiles) and not (c.num_warps == 8 and bm * c.BLOCK_N < 64 * 128)]

        def distance(c):  # the default first, then its neighbours
            return (c != default, abs(c.BLOCK_N - default.BLOCK_N) / 32 + abs(c.BLOCK_K - default.BLOCK_K) / 32
                    + (c.num_warps != default.num_warps) + abs(c.num_stages - default.num_stages)
                    + (c.GROUP_M != default.GROUP_M))

        return sorted(space, key=distance)

    start = time.time()
    table: dict[str, dict] = {}
    print(f"{'tokens':>7} {'BLOCK_M':>7} {'gate_up (N,K,G,w,s)':>24} {'down (N,K,G,w,s)':>22} {'ms':>8} {'TFLOP/s':>8}")
    for T in tokens:
        x = rnd(T, D)
        ids = torch.rand(T, E, generator=g, device=device).topk(K, dim=-1).indices
        tok, exp = torch.arange(T, device=device).repeat_interleave(K), ids.reshape(-1)
        wt = torch.rand(T * K, generator=g, device=device).to(dtype)
        launch, _ = kernels.prepare(x, tok, exp, wt, w_up, w_down, None, None, act, gated, None, None, sw_up, sw_down,
                                    None)
        SH = launch.SH
        rows = (T * K + SH * T) / (E + SH)
        default = configs.default_config(rows, dtype)
        block_ms = sorted(set(args.block_m) if args.block_m else
                          {default.BLOCK_M} | {bm for bm in (16, 32, 64, 128) if bm <= max(16, 2 * rows)})
        best = None  # (ms, cfg)
        # Each token count gets an equal share of the budget, split evenly over its (BLOCK_M, GEMM) searches.
        t_end = time.time() + (args.budget_s - (time.time() - start)) / (len(tokens) - tokens.index(T))
        searches_left = 2 * len(block_ms)
        for bm in block_ms:
            aligned = launch.align(bm)
            base = configs.fit(configs.MoEConfig(bm, default.gate_up, default.down), D, F)
            results = {}
            for part, b_tiles in (("gate_up", 2 if gated else 1), ("down", 1)):
                best_part = None
                deadline = time.time() + max(0.0, t_end - time.time()) / searches_left
                searches_left -= 1
                h = launch.gate_up(aligned, bm, base.gate_up) if part == "down" else None
                n_dim, k_dim = (F, D) if part == "gate_up" else (D, F)
                fitted = [configs.fit_gemm(c, n_dim, k_dim) for c in candidates(bm, getattr(base, part), b_tiles)]
                for c in dict.fromkeys(fitted):  # tiles wider than the problem collapse onto one candidate
                    if time.time() > deadline and best_part is not None:
                        break
                    fn = (functools.partial(launch.gate_up, aligned, bm, c) if part == "gate_up"
                          else functools.partial(launch.down, aligned, bm, c, h))
                    try:
                        ms = bench(fn)
                    except Exception as exc:  # out of resources, or a compiler limit: skip the candidate
                        print(f"  skip {part} BLOCK_M={bm} {c}: {type(exc).__name__}", file=sys.stderr)
                        continue
                    if best_part is None or ms < best_part[0]:
                        best_part = (ms, c)
                    if args.dry_run:
                        break  # the interpreter times nothing useful: one candidate proves the path
                results[part] = best_part
                if best_part is None:  # every candidate failed: no configuration with this BLOCK_M
                    print(f"  every {part} candidate failed at BLOCK_M={bm}: BLOCK_M={bm} skipped", file=sys.stderr)
                    searches_left -= part == "gate_up"  # the down search it would have run
                    break
                if part == "gate_up":
                    base = configs.MoEConfig(bm, best_part[1], base.down)
            if results.get("down") is None:
                continue
            total = results["gate_up"][0] + results["down"][0]
            cfg = configs.MoEConfig(bm, results["gate_up"][1], results["down"][1])
            if best is None or total < best[0]:
                best = (total, cfg)
        if best is None:
            print(f"{T:>7} every candidate failed at every BLOCK_M: no entry for {T} tokens", flush=True)
            continue
        ms, cfg = best
        flops = 2 * T * (K + SH) * (H + F) * D  # gate/up: D x H per row, down: F x D
        fmt = lambda c: f"{c.BLOCK_N},{c.BLOCK_K},{c.GROUP_M},{c.num_warps},{c.num_stages}"  # noqa: E731
        print(f"{T:>7} {cfg.BLOCK_M:>7} {fmt(cfg.gate_up):>24} {fmt(cfg.down):>22} {ms:>8.3f} "
              f"{flops / ms / 1e9:>8.1f}", flush=True)
        table[str(T)] = cfg.to_json()

    if not table:
        sys.exit("tune_triton.py: no configuration ran at any token count; no table written")
    path = configs.table_path(E, F, device_name, dtype, args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(table)
    path.write_text(json.dumps(dict(sorted(old.items(), key=lambda kv: int(kv[0]))), indent=2) + "\n")
    print(f"wrote {path} ({len(old)} token counts) in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
