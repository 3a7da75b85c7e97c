"""Expert parallelism over torch.distributed (gloo on CPU, NCCL on GPU), following a placement plan.

    torchrun --nproc-per-node 4 train.py        # each rank:
        dist.init_process_group()                 # gloo or nccl
        layer = moegraph.compile(spec, plan="plan.json", seed=None)   # this rank's slots only
        layer.load_checkpoint("moe.safetensors")  # the single-process checkpoint, own experts only
        y = layer(x_local); y.sum().backward(); layer.sync_grads()

Pieces: ``ExpertParallelMoE`` (the layer, ``layer.py``), ``ExpertDispatch`` (dispatch / local
compute / combine, ``dispatch.py``), ``Comm`` and ``AllToAll`` (collectives with timeouts and byte
counts, ``comm.py``), ``SlotExperts`` and ``load_checkpoint`` (rank-local weights and state-dict
keys, ``weights.py``), ``gather_trace`` and ``predicted_copies`` (record -> re-plan, ``trace.py``).

Live: ``layer.apply_plan(new_plan, optimizer=opt)`` migrates a running layer, sending only the
changed slots, and ``apply_plan(layers, new_plan, opt)`` every layer of a model, all or none
(``migrate.py``); ``Rebalancer`` (``rebalance.py``) re-plans from a windowed recording
and applies the result every N steps or on measured imbalance.

Record -> plan -> reload: record on every rank (``layer.start_recording()``), ``gather_trace`` into
one ``TraceSet``, save it, ``moegraph plan SPEC --traces trace.npz`` (or ``moegraph.planner.plan``),
then compile with the new plan and load the same checkpoint: every placement takes the same file.
"""

from __future__ import annotations

from ..errors import DistributedError
from .comm import AllToAll, Comm, Traffic
from .dispatch import ExpertDispatch
from .layer import ExpertParallelMoE, ExpertParallelPass
from .migrate import apply_plan
from .rebalance import Rebalancer, WindowRecorder
from .trace import gather_trace, predicted_copies
from .weights import MissingExpertWeights, SlotExperts, load_checkpoint

__all__ = [
    "AllToAll",
    "Comm",
    "DistributedError",
    "ExpertDispatch",
    "ExpertParallelMoE",
    "ExpertParallelPass",
    "MissingExpertWeights",
    "Rebalancer",
    "SlotExperts",
    "Traffic",
    "WindowRecorder",
    "apply_plan",
    "gather_trace",
    "load_checkpoint",
    "predicted_copies",
]
