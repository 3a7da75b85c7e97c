"""The placement planner: which GPU holds which expert, and which hot experts get replicas.

    plan(spec, traces) -> Plan       # traces: routing traces (moegraph.traces), not FX traces

The driver (``driver.plan``) goes over the MoE layers. For every layer the routing traces give a
placement graph (``graph``: experts weighted by load, co-activation edges, load covariance over
token windows). Replica counts follow the load-only
rule (in layers of at most REPLICA_MOVE_MAX_SLOTS slots one replica may move to another expert when
that lowers the remote copies on the planning traffic without worse balance there); the replicas
are placed by a constrained local search (``search``: minimise expected dispatch + combine cost
under the topology's link costs, keep every GPU within ``max_imbalance`` on the traffic seen and no
more exposed than the load-only plan to traffic not seen), which small layers finish on the exact
expected copies per token (``exact``). Replica counts are chosen on the pairwise search alone and
the chosen layout is then refined once. The Plan records the policy, the
dispatch rule (``dispatch``) and the predicted metrics (``cost``) beside the contiguous and
load-only baselines (``baselines``) on the same traffic. Layers do not interact, so a large plan
searches and measures them in forked processes, one per usable core (``forked``), with the result
of one process bit for bit.

Re-planning while running (warm-started from the current plan, moves priced, relabelling to move
least) is ``replan`` (module ``replan``).

Modules, each importing only those before it: ``blas`` (one OpenBLAS thread), ``forked`` (layers in
processes), ``dispatch``,
``planfile``, ``cost``, ``baselines``, ``graph``, ``exact``, ``search``, ``driver``, ``migration``,
``replan`` (``plot`` and ``export`` read finished plans). This package file only re-exports.

Load-only traces (counts without co-activation) still plan: the result is the balanced load-only
packing, with a note that communication was not optimised. Without any traces the plan is a
balanced default (every expert equally loaded).
"""

from __future__ import annotations

from .baselines import baseline_plans, evaluate_plan
from .cost import evaluate
from .dispatch import RULE, choose_replicas, dispatch_counts
from .driver import DEFAULT_ROUNDS, DEFAULT_ROUNDS_NO_REPLICAS, check_feasible, override_spec, plan
from .graph import placement_graph
from .planfile import Plan
from .replan import migration, relabel, replan

__all__ = [
    "plan",
    "Plan",
    "evaluate",
    "evaluate_plan",
    "baseline_plans",
    "override_spec",
    "check_feasible",
    "choose_replicas",
    "dispatch_counts",
    "placement_graph",
    "RULE",
    "DEFAULT_ROUNDS",
    "DEFAULT_ROUNDS_NO_REPLICAS",
    "replan",
    "relabel",
    "migration",
]
