"""Record -> plan -> reload: a cluster re-plans its expert placement from its own traffic.

    torchrun --nproc-per-node 4 examples/replan_loop.py --spec deepseek-v3-tiny
    torchrun --nproc-per-node 2 examples/replan_loop.py --workdir out/   # keeps trace.npz, plan.json

The model here is the spec's MoE layers as a residual stack (h = h + moe_i(h)), each expert-parallel.
Every rank serves tokens of its own "topic" (a rank-specific mean), so routing depends on where
tokens come from, as it does when ranks serve different users or tasks.

1. Start from the contiguous placement (slot p holds expert p % E): what runs without a plan.
2. Serve batches with the recorders on. ``gather_trace`` all-gathers every rank's routing into one
   TraceSet that keeps each token's source rank; rank 0 saves it as ``trace.npz``, the file
   ``moegraph plan SPEC --trace trace.npz`` reads.
3. Plan from the trace (``moegraph.planner.plan``) and save ``plan.json``.
4. Compile the stack under the new plan and load the same checkpoint (one file serves every
   placement): outputs are unchanged, and the token copies the ranks send (measured by the
   runtime) match the planner's prediction for both placements.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import moegraph
from moegraph.distributed import gather_trace, predicted_copies
from moegraph.planner import Plan, override_spec
from moegraph.planner import plan as make_plan
from moegraph.planner.baselines import contiguous
from moegraph.argtypes import positive_int


def spec_for_world(spec, world: int):
    """The spec itself if its topology has ``world`` GPUs, else one host of ``world`` GPUs."""
    if spec.topology.num_gpus == world:
        return spec
    e = spec.moe.experts.num_experts
    slots = -(-(e + spec.placement.redundant_slots) // world) * world
    return override_spec(spec, nodes=1, gpus_per_node=world, slots=min(slots, e * world))


def broadcast(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def build_stack(spec, plan, ckpt_dir: Path, device, timeout: float):
    """One expert-parallel layer per MoE layer, each loading its single-process checkpoint file."""
    layers = []
    for i in range(plan.num_layers):
        layer = moegraph.compile(spec, plan=plan, layer_index=i, seed=None, dtype=torch.float32, device=device,
                                 timeout=timeout)
        layer.load_checkpoint(ckpt_dir / f"moe_layer{i}.safetensors")
        layer.eval()
        layers.append(layer)
    return layers


@torch.no_grad()
def serve(layers, batches, record: bool):
    """Run every batch through the stack; returns the outputs and the token copies sent per layer."""
    for layer in layers:
        layer.reset_traffic()
        if record:
            layer.start_recording()
    outs = []
    for x in batches:
        h = x
        for layer in layers:
            h = h + layer(h)
        outs.append(h)
    sent = np.stack([layer.traffic.rows["dispatch"] for layer in layers])  # [L, G] copies this rank sent
    load = np.array([layer.traffic.computed for layer in layers])  # [L] assignments computed here
    return outs, sent, load


def predicted(plan, trace, world: int, tokens: int, batches: int) -> int:
    """The planner's token copies for the recorded routing, one forward (per-rank token order) at a time."""
    total = 0
    for j in range(trace.num_layers):
        by_rank = [trace.topk[j][trace.src_rank == r] for r in range(world)]
        for b in range(batches):
            total += int(predicted_copies(plan, j, [ids[b * tokens:(b + 1) * tokens] for ids in by_rank]).sum())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="deepseek-v3-tiny", help="spec file or preset name")
    ap.add_argument("--tokens", type=positive_int, default=64, help="tokens per rank per batch")
    ap.add_argument("--batches", type=positive_int, default=4)
    ap.add_argument("--topic", type=float, default=1.5, help="strength of each rank's own token mean")
    ap.add_argument("--workdir", help="where trace.npz, plan.json and the checkpoints go (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0)
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

    spec = spec_for_world(moegraph.load_spec(args.spec), world)
    E, S, L = spec.moe.experts.num_experts, spec.moe.experts.num_experts + spec.placement.redundant_slots, \
        spec.model.num_moe_layers
    tmp = tempfile.TemporaryDirectory(prefix="moegraph-replan-") if rank == 0 and not args.workdir else None
    work = Path(broadcast(args.workdir or (tmp.name if tmp else None)))
    if rank == 0:
        # The single-process checkpoints: one file per MoE layer, the same for every placement.
        from safetensors.torch import save_file

        work.mkdir(parents=True, exist_ok=True)
        for i in range(L):
            full = moegraph.compile(spec, seed=args.seed + i, dtype=torch.float32)
            state = {k: v.contiguous() for k, v in full.state_dict().items()}
            save_file(state, str(work / f"moe_layer{i}.safetensors"))
    dist.barrier()

    # Tokens: every rank draws around its own topic.
    g = torch.Generator().manual_seed(args.seed)
    topics = torch.randn(world, spec.moe.hidden_size, generator=g) * args.topic
    gr = torch.Generator().manual_seed(args.seed * 1000 + rank + 1)
    batches = [(topics[rank] + torch.randn(args.tokens, spec.moe.hidden_size, generator=gr)).to(device)
               for _ in range(args.batches)]

    # Step 1-2: serve under the contiguous placement with the recorders on; gather one trace.
    plan0 = Plan(np.stack([contiguous(E, S)] * L), spec, policy={"name": "contiguous"})
    stack0 = build_stack(spec, plan0, work, device, args.timeout)
    out0, sent0, load0 = serve(stack0, batches, record=True)
    trace = gather_trace(stack0, name="replan-loop")
    if rank == 0:
        trace.save(work / "trace.npz")
    say(f"recorded {trace.num_tokens} tokens x {trace.num_layers} MoE layers on {trace.num_ranks} ranks -> "
        f"{work / 'trace.npz'}")

    # Step 3: plan from the cluster's own traffic (rank 0), everyone loads the same plan file.
    if rank == 0:
        make_plan(spec, trace).save(work / "plan.json")
    dist.barrier()
    plan1 = Plan.load(work / "plan.json", spec=spec)
    say(f"new plan: {plan1.policy.get('name')} -> {work / 'plan.json'}")

    # Step 4: reload the same checkpoints into the new placement and serve the same batches.
    stack1 = build_stack(spec, plan1, work, device, args.timeout)
    out1, sent1, load1 = serve(stack1, batches, record=False)
    diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(out1, out0))
    print(f"rank {rank}: experts of MoE layer 0 before {stack0[0].slot_experts} after {stack1[0].slot_experts}; "
          f"max relative output difference {diff:.2e}", flush=True)

    node = np.asarray(plan0.node_of_gpu)
    remote = node != node[rank]  # destinations on other hosts
    measured = torch.tensor([[int(s.sum()), int(s[:, remote].sum())] for s in (sent0, sent1)], dtype=torch.int64,
                            device=device)
    dist.all_reduce(measured)
    loads = [torch.zeros(world, L, dtype=torch.int64, device=device) for _ in range(2)]
    for t, mine in zip(loads, (load0, load1)):
        t[rank] = torch.as_tensor(mine, device=device)
        dist.all_reduce(t)
    for name, p, m, t in zip(("contiguous plan", "re-planned"), (plan0, plan1), measured, loads):
        # Balance: per MoE layer, the busiest rank's computed assignments over the mean; worst layer.
        imb = (t.max(0).values.double() / t.double().mean(0).clamp(min=1)).max().item()
        pred = predicted(p, trace, world, args.tokens, args.batches)
        say(f"{name:>15}: token copies sent {int(m[0])} (planner predicted {pred}), {int(m[1])} of them across hosts; "
            f"max/mean expert load over ranks {imb:.3f}")
    dist.barrier()
    if tmp is not None:
        tmp.cleanup()
    # Free every tensor that async collectives touched while the interpreter is fully alive: gloo's
    # worker threads must not be the last owners at interpreter teardown (pytorch/pytorch#179291).
    del stack0, stack1
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
