"""The ``Plan``: which logical expert every physical slot holds, per MoE layer, and its JSON file.

Slot ``p`` of a layer lives on GPU ``p // slots_per_gpu``; ``physical_to_logical_map`` [layers][slots]
is the same layout SGLang accepts as ``--init-expert-location``. The file (JSON, ``format:
moegraph-plan``, ``version: 1``) also holds the spec it was planned for (with its hash), the
derived ``logical_to_physical_map`` and per-GPU expert lists, the dispatch rule, the planner's
policy and the predicted metrics beside the baselines'. ``Plan.load`` checks everything it reads:
a truncated, corrupt or inconsistent file raises ``PlanFileError`` naming the path.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from ..errors import PlanFileError, short_repr
from ..fileio import check_input, unique_json_object, write_atomically
from ..spec import MoESpec
from ..topology import Cluster, cluster_of
from .dispatch import RULE, replica_table

__all__ = ["Plan", "FORMAT", "VERSION", "check_made_for"]

FORMAT = "moegraph-plan"
VERSION = 1
#: the largest plan file read (DeepSeek-V3's 58 layers x 288 slots with its spec: well under 1 MiB)
MAX_PLAN_BYTES = 256 << 20


def check_made_for(planned: MoESpec, spec: MoESpec, where: str) -> None:
    """Refuse (PlanFileError) a plan made for spec ``planned`` where ``spec`` runs, naming the fields they differ in:
    the one check of a plan file loaded with a spec, ``compile(spec, plan=...)`` and an expert-parallel layer."""
    if planned.hash() != spec.hash():
        raise PlanFileError(
            f"{where}: planned for spec {planned.name!r} (hash {planned.short_hash}) but the given spec {spec.name!r} "
            f"has hash {spec.short_hash}; they differ in "
            f"{spec.differences_shown(planned, labels=('in the given spec', 'in the plan'))}; re-plan for this spec "
            f"(`moegraph plan {shlex.quote(spec.name)}`) or pass the spec it was made for")


def _non_finite_at(obj: Any, path: str = "") -> tuple[str, float] | None:
    """(the dotted path, the value) of the first NaN or infinity in parsed JSON, or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path or "(the whole file)", obj)
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        found = _non_finite_at(value, f"{path}.{key}" if path and isinstance(key, str) else
                               f"{path}[{key}]" if path else str(key))
        if found is not None:
            return found
    return None


@dataclass(eq=False)
class Plan:
    """A placement of experts (and replicas) on GPUs for every MoE layer of one spec."""

    physical_to_logical_map: np.ndarray  # [L, S] logical expert held by each physical slot
    spec: MoESpec  # the (possibly overridden) spec the plan was made for
    metrics: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.physical_to_logical_map = np.asarray(self.physical_to_logical_map, np.int64)
        problem = _check_shapes(self.physical_to_logical_map, self.spec)
        assert problem is None, f"internal: invalid plan: {problem}"
        self._tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._torch_tables: dict[tuple[int, str], Any] = {}

    # ------------------------------------------------------------------ shape

    @property
    def spec_hash(self) -> str:
        return self.spec.hash()

    @property
    def num_layers(self) -> int:
        return self.physical_to_logical_map.shape[0]

    @property
    def num_slots(self) -> int:
        return self.physical_to_logical_map.shape[1]

    @property
    def num_experts(self) -> int:
        return self.spec.moe.experts.num_experts

    @cached_property
    def cluster(self) -> Cluster:
        return cluster_of(self.spec)

    @property
    def num_gpus(self) -> int:
        return self.spec.topology.num_gpus

    @property
    def gpus_per_node(self) -> int | None:
        """GPUs per host (None for an explicit topology with hosts of different sizes)."""
        return self.cluster.gpus_per_node

    @property
    def node_of_gpu(self) -> np.ndarray:
        return self.cluster.node_of_gpu

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.num_gpus

    @property
    def logical_to_physical_map(self) -> list[list[list[int]]]:
        """[layers][experts][replicas] physical slots of each logical expert, in slot order."""
        out = []
        for row in self.physical_to_logical_map:
            per = [[] for _ in range(self.num_experts)]
            for p, e in enumerate(row.tolist()):
                per[e].append(p)
            out.append(per)
        return out

    def log2phy_padded(self) -> np.ndarray:
        """[L, E, R_max] the same as ``logical_to_physical_map``, padded with -1 (SGLang's layout)."""
        l2p = self.logical_to_physical_map
        r = max(len(x) for layer in l2p for x in layer)
        out = np.full((self.num_layers, self.num_experts, r), -1, np.int64)
        for i, layer in enumerate(l2p):
            for e, slots in enumerate(layer):
                out[i, e, : len(slots)] = slots
        return out

    def replica_counts(self) -> np.ndarray:
        """[L, E] replicas of each expert."""
        return np.stack([np.bincount(r, minlength=self.num_experts) for r in self.physical_to_logical_map])

    def gpu_experts(self, layer: int, gpu: int) -> list[int]:
        """Logical experts held by one GPU in one MoE layer, in slot order."""
        s = self.slots_per_gpu
        return self.physical_to_logical_map[layer, gpu * s : (gpu + 1) * s].tolist()

    # ------------------------------------------------------------------ dispatch tables

    def replica_table(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Cached ``dispatch.replica_table`` of one layer: ([G, E, R] candidate slots, [G, E] counts)."""
        if layer not in self._tables:
            self._tables[layer] = replica_table(
                self.physical_to_logical_map[layer], self.num_experts, self.slots_per_gpu, self.node_of_gpu
            )
        return self._tables[layer]

    def replica_table_torch(self, layer: int, device: Any):
        key = (layer, str(device))
        if key not in self._torch_tables:
            import torch

            cand, n = self.replica_table(layer)
            # Empty tiers never occur (every expert has a replica); clamp keeps the modulo defined.
            self._torch_tables[key] = (
                torch.as_tensor(cand, device=device),
                torch.as_tensor(np.maximum(n, 1), device=device),
            )
        return self._torch_tables[key]

    # ------------------------------------------------------------------ file

    def to_dict(self) -> dict[str, Any]:
        cl = self.cluster
        return {
            "format": FORMAT,
            "version": VERSION,
            "spec_hash": self.spec_hash,
            "spec_name": self.spec.name,
            "num_layers": self.num_layers,
            "moe_layer_indices": list(self.spec.model.moe_layer_indices),
            "num_experts": self.num_experts,
            "num_gpus": self.num_gpus,
            "gpus_per_node": self.gpus_per_node,
            "node_of_gpu": cl.node_of_gpu.tolist(),
            "slots_per_gpu": self.slots_per_gpu,
            "num_slots": self.num_slots,
            "dispatch_rule": RULE,
            "physical_to_logical_map": self.physical_to_logical_map.tolist(),
            "logical_to_physical_map": self.logical_to_physical_map,
            "gpu_experts": [[self.gpu_experts(i, g) for g in range(self.num_gpus)] for i in range(self.num_layers)],
            "policy": self.policy,
            "metrics": self.metrics,
            "notes": list(self.notes),
            "spec": self.spec.to_dict(),
        }

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON (``write_atomically``: a crash or a full disk never leaves a half-written plan)."""
        p = Path(path)
        try:
            text = json.dumps(_jsonable(self.to_dict()), indent=1, allow_nan=False) + "\n"
        except ValueError as exc:  # NaN or infinity in a figure: a bug upstream, never written as 'NaN'
            raise PlanFileError(f"{p}: the plan holds a non-finite number ({exc}); not writing it") from None
        return write_atomically(p, lambda tmp: tmp.write_text(text, encoding="utf-8"), "plan", PlanFileError)

    @classmethod
    def load(cls, path: str | Path, spec: MoESpec | None = None) -> Plan:
        """Read and check a plan file; with ``spec`` (a spec, or a preset name or spec file), the plan must have
        been made for that spec."""
        if not isinstance(path, (str, os.PathLike)):
            raise PlanFileError(f"Plan.load takes the plan file's path (a str or Path), got {type(path).__name__}")
        if spec is not None and not isinstance(spec, MoESpec):
            from ..loader import load_spec

            spec = load_spec(spec)  # a preset name or spec file, as compile and replan take
        p = Path(path)
        check_input(p, "plan file", PlanFileError, MAX_PLAN_BYTES)
        try:
            data = json.loads(p.read_text(encoding="utf-8-sig"), object_pairs_hook=unique_json_object)
        except FileNotFoundError:
            raise PlanFileError(f"{p}: plan file not found; make one with `moegraph plan SPEC -o {p.name}`") from None
        except IsADirectoryError:
            raise PlanFileError(f"{p}: is a folder; give the plan file (.json)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanFileError(f"{p}: truncated or corrupt plan file ({exc}); re-create it with `moegraph plan`") from None
        except RecursionError:
            raise PlanFileError(f"{p}: nested too deeply to be a plan file; re-create it with `moegraph plan`") from None
        except ValueError as exc:  # an integer of thousands of digits (int_max_str_digits)
            raise PlanFileError(f"{p}: not a plan file ({' '.join(str(exc).split())[:120]}); re-create it with "
                                "`moegraph plan`") from None
        where = _non_finite_at(data)
        if where is not None:  # Python's json reads NaN / Infinity, which JSON does not have
            raise PlanFileError(f"{p}: field {where[0]} is {short_repr(where[1])}, not a finite number (NaN and "
                                "Infinity are not "
                                "JSON); the file was edited or is corrupt: re-create it with `moegraph plan`")
        return cls.from_dict(data, spec=spec, source=str(p))

    @classmethod
    def from_dict(cls, data: Any, spec: MoESpec | None = None, source: str = "<plan>") -> Plan:
        def bad(msg: str) -> PlanFileError:
            return PlanFileError(f"{source}: {msg}")

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise bad("not a moegraph plan file (format is not 'moegraph-plan')")
        if type(data.get("version")) is not int or data.get("version") != VERSION:  # JSON true is not version 1
            raise bad(f"plan format version {short_repr(data.get('version'))} is not supported (this moegraph reads "
                      f"version {VERSION}); re-create the plan with `moegraph plan`")
        for key in ("spec", "spec_hash", "physical_to_logical_map"):
            if key not in data:
                raise bad(f"field {key!r} is missing; the file is truncated or corrupt: re-create it with "
                          "`moegraph plan`")
        try:
            embedded = MoESpec.model_validate(data["spec"])
        except (ValidationError, TypeError, ValueError) as exc:
            why = type(exc).__name__
            if isinstance(exc, ValidationError) and exc.errors():
                first = exc.errors()[0]
                where = ".".join(str(x) for x in first.get("loc", ()))
                more = f" and {exc.error_count() - 1} more" if exc.error_count() > 1 else ""
                why = f"spec.{where}: {first.get('msg')}{more}"
            raise bad(f"the embedded spec is not valid ({why}); re-create the plan") from None
        if embedded.hash() != data["spec_hash"]:
            raise bad(f"spec_hash does not match the embedded spec; {_REMAKE}")
        if spec is not None:
            check_made_for(embedded, spec, source)
        try:
            p2l = np.asarray(data["physical_to_logical_map"])
        except (TypeError, ValueError):
            raise bad(f"physical_to_logical_map is not a [layers][slots] array of integers; {_REMAKE}") from None
        if p2l.dtype == object or p2l.ndim != 2 or (p2l.size and not np.issubdtype(p2l.dtype, np.integer)):
            raise bad(f"physical_to_logical_map is not a [layers][slots] array of integers; {_REMAKE}")
        if any(isinstance(x, bool) for row in data["physical_to_logical_map"] for x in row):  # JSON true reads as 1
            raise bad("physical_to_logical_map holds true / false where expert ids go; the file was edited or is "
                      "corrupt: re-create it with `moegraph plan`")
        problem = _check_shapes(p2l.astype(np.int64), embedded)
        if problem:
            raise bad(f"{problem}; {_REMAKE}")
        plan = cls(p2l, embedded, metrics=data.get("metrics") or {}, policy=data.get("policy") or {},
                   notes=list(data.get("notes") or []))
        # Derived fields must agree with the map (a hand-edited file is refused, not half-used).
        if "logical_to_physical_map" in data and data["logical_to_physical_map"] != plan.logical_to_physical_map:
            raise bad(f"logical_to_physical_map disagrees with physical_to_logical_map (it is derived from it); "
                      f"{_REMAKE}")
        derived = {
            "slots_per_gpu": plan.slots_per_gpu, "num_gpus": plan.num_gpus, "num_experts": plan.num_experts,
            "num_layers": plan.num_layers, "num_slots": plan.num_slots, "gpus_per_node": plan.gpus_per_node,
            "node_of_gpu": plan.node_of_gpu.tolist(), "spec_name": embedded.name,
            "moe_layer_indices": list(embedded.model.moe_layer_indices), "dispatch_rule": RULE,
            "gpu_experts": [[plan.gpu_experts(i, g) for g in range(plan.num_gpus)] for i in range(plan.num_layers)],
        }
        for key, want in derived.items():
            # type(...) too: JSON's 1.0 == 1 and true == 1 would otherwise pass
            if key in data and (data[key] != want or _types(data[key]) != _types(want)):
                shown = json.dumps(data[key])[:80]
                raise bad(f"{key} is {shown} but the map and spec imply {json.dumps(want)[:80]}; the file was "
                          "edited or is corrupt: re-create it with `moegraph plan`")
        for key, kind in (("metrics", dict), ("policy", dict), ("notes", list)):
            if data.get(key) is not None and not isinstance(data[key], kind):
                raise bad(f"{key} is a {type(data[key]).__name__}, expected a JSON {'object' if kind is dict else 'list'}")
        if not all(isinstance(n, str) for n in plan.notes):
            raise bad("notes must be a list of strings")
        return plan


#: what to do about a plan file whose fields contradict each other or the embedded spec
_REMAKE = "the file was edited or is corrupt: re-create it with `moegraph plan`"


def _types(value: Any) -> Any:
    """The JSON types inside a value (to tell 1 from 1.0 and true)."""
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value).__name__


def _check_shapes(p2l: np.ndarray, spec: MoESpec) -> str | None:
    """None if ``p2l`` [L, S] is a valid placement for ``spec``, else what is wrong."""
    e = spec.moe.experts.num_experts
    layers = spec.model.num_moe_layers
    slots = e + spec.placement.redundant_slots
    g = spec.topology.num_gpus
    if p2l.ndim != 2 or p2l.shape != (layers, slots):
        return (f"physical_to_logical_map has shape {list(p2l.shape)} but the spec needs [{layers} MoE layers, "
                f"{slots} slots]")
    if p2l.size and (p2l.min() < 0 or p2l.max() >= e):
        return f"physical_to_logical_map holds expert ids outside 0..{e - 1}"
    per = slots // g
    for i, row in enumerate(p2l):
        missing = np.flatnonzero(np.bincount(row, minlength=e) == 0)
        if len(missing):
            return f"layer {i}: expert {int(missing[0])} has no slot; every expert needs at least one"
        on_gpu = row.reshape(g, per)
        for gpu in range(g):
            if len(np.unique(on_gpu[gpu])) != per:
                return f"layer {i}: GPU {gpu} holds the same expert twice"
    return None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj
