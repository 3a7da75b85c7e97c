"""Run a compiled MoE layer expert-parallel across processes, following a placement plan.

    torchrun --nproc-per-node 2 examples/expert_parallel.py --spec deepseek-v3-tiny
    torchrun --nproc-per-node 4 examples/expert_parallel.py --plan plan.json --checkpoint moe.safetensors

Every rank initialises torch.distributed (NCCL when CUDA is available, else gloo), compiles the
spec with the plan (the layer holds only this rank's plan slots, replicas included), loads the
single-process checkpoint (reading only its own experts), checks its first step against the
single-process layer, then trains a few steps on its own tokens: forward (router, dispatch
all-to-all, local experts, combine all-to-all), backward (the reverse all-to-alls), sync_grads
(data-parallel router and shared experts, replicated experts summed over replicas), SGD step.

Without --plan the example plans for this world size on one host (the spec's topology replaced by
1 node x WORLD GPUs) from no traces: a balanced default placement. Without --checkpoint rank 0
writes a seeded single-process checkpoint to a temporary directory.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

import moegraph
from moegraph.planner import Plan, override_spec
from moegraph.planner import plan as make_plan
from moegraph.argtypes import positive_int


def spec_for_world(spec, world: int):
    """The spec itself if its topology has ``world`` GPUs, else one host of ``world`` GPUs."""
    if spec.topology.num_gpus == world:
        return spec
    e = spec.moe.experts.num_experts
    slots = -(-(e + spec.placement.redundant_slots) // world) * world
    return override_spec(spec, nodes=1, gpus_per_node=world, slots=min(slots, e * world))


def read_checkpoint(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def broadcast(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="deepseek-v3-tiny", help="spec file or preset name")
    ap.add_argument("--plan", help="plan file (default: plan for this world size)")
    ap.add_argument("--checkpoint", help="single-process checkpoint (.safetensors or .pt)")
    ap.add_argument("--layer", type=int, default=0, help="MoE layer of the plan")
    ap.add_argument("--tokens", type=positive_int, default=64, help="tokens per rank")
    ap.add_argument("--steps", type=positive_int, default=3, help="training steps")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds a collective waits for peers")
    args = ap.parse_args()
    if not args.timeout > 0:  # every rank refuses alike, before any collective
        ap.error(f"argument --timeout: must be a positive number of seconds, got {args.timeout}")

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    say = print if rank == 0 else (lambda *a, **k: None)

    # Step 1: the plan (every rank must use the same one: rank 0 decides, the others receive it).
    if args.plan:
        plan = Plan.load(args.plan)
    else:
        spec = spec_for_world(moegraph.load_spec(args.spec), world)
        plan = Plan.from_dict(broadcast(make_plan(spec).to_dict() if rank == 0 else None))
    spec = plan.spec
    say(f"spec {spec.name} ({spec.short_hash}), {world} ranks, {plan.slots_per_gpu} slots per rank")

    # Step 2: one checkpoint for every world size and plan: the single-process layer's state dict.
    tmp = tempfile.TemporaryDirectory(prefix="moegraph-ep-") if rank == 0 and not args.checkpoint else None
    ckpt = args.checkpoint
    if not ckpt:
        if rank == 0:
            from safetensors.torch import save_file

            ckpt = str(Path(tmp.name) / "moe.safetensors")
            full = moegraph.compile(spec, seed=args.seed, dtype=torch.float32)
            save_file({k: v.contiguous() for k, v in full.state_dict().items()}, ckpt)
        ckpt = broadcast(ckpt)

    # Step 3: the expert-parallel layer: this rank's slots only, weights read from the checkpoint.
    layer = moegraph.compile(spec, plan=plan, layer_index=args.layer, seed=None, dtype=torch.float32, device=device,
                             timeout=args.timeout)
    layer.load_checkpoint(ckpt)
    print(f"rank {rank}: experts {layer.slot_experts}", flush=True)

    g = torch.Generator().manual_seed(args.seed * 1000 + rank)
    x = torch.randn(args.tokens, layer.HIDDEN, generator=g).to(device)
    target = torch.randn(args.tokens, layer.HIDDEN, generator=g).to(device)

    # Step 4: the first step against the single-process layer on this rank's tokens.
    ref = moegraph.compile(spec, seed=None, dtype=torch.float32, device=device)
    ref.load_state_dict(read_checkpoint(ckpt))
    xr = x.clone().requires_grad_(True)
    y_ref = ref(xr)
    (y_ref - target).square().mean().backward()
    xe = x.clone().requires_grad_(True)
    y = layer(xe)
    (y - target).square().mean().backward()
    err_y = ((y - y_ref).abs().max() / y_ref.abs().max()).item()
    err_g = ((xe.grad - xr.grad).abs().max() / xr.grad.abs().max()).item()
    print(f"rank {rank}: max relative error vs single-process: output {err_y:.2e}, input gradient {err_g:.2e}",
          flush=True)
    layer.zero_grad(set_to_none=True)

    # Step 5: a few training steps; router and shared experts are data-parallel.
    opt = torch.optim.SGD(layer.parameters(), lr=args.lr)
    layer.reset_traffic()
    for step in range(args.steps):
        loss = (layer(x) - target).square().mean()
        loss.backward()
        layer.sync_grads(average=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        say(f"step {step}: loss {mean.item() / world:.5f}")

    # Step 6: what each rank sent and how long each phase took.
    stats = [None] * world
    dist.all_gather_object(stats, layer.traffic_summary())
    for s in stats:
        sec = {k: 1e3 * v / max(s["calls"], 1) for k, v in s["seconds"].items()}
        say(f"rank {s['rank']}: dispatch {sec['dispatch']:.2f} ms, compute {sec['compute']:.2f} ms, combine "
            f"{sec['combine']:.2f} ms per forward; sent {sum(s['bytes']['dispatch']) // max(s['calls'], 1)} B of "
            f"tokens and {sum(s['bytes']['combine']) // max(s['calls'], 1)} B of results per forward")
    dist.barrier()
    if tmp is not None:
        tmp.cleanup()
    # Free every tensor that async collectives touched while the interpreter is fully alive: gloo's
    # worker threads must not be the last owners at interpreter teardown (pytorch/pytorch#179291).
    del layer
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except moegraph.MoegraphError as exc:
        # Exit at once with the error: after a failed collective the process group's teardown can wait
        # forever for a peer that stalled, so a normal interpreter exit could hang this rank.
        print(f"rank {os.environ.get('RANK', '?')}: error: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
