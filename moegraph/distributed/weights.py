"""Rank-local expert weights: which slots a rank holds, and how a full checkpoint loads into them.

One checkpoint serves every world size and plan: the single-process layer's state dict (fused
expert tensors ``experts.gate_up_proj`` [E, 2F, D], ``experts.down_proj`` [E, D, F], ...) loads into
any expert-parallel layer, which takes the rows of its own slots (replicas included).

State-dict keys of an expert-parallel layer (``state_dict()``) are distinct from the fused ones, so
that a rank-local file is never mistaken for a full one:

- ``experts.slots.<name>`` [S_local, ...]: this rank's slot weights, in slot order;
- ``experts.slots.logical_ids`` [S_local]: the logical expert each slot holds;
- ``experts.slots.physical_ids`` [S_local]: the plan's physical slot ids.

Everything else (router, shared experts, buffers) keeps its single-process key. ``load_state_dict``
accepts, for each expert this rank needs, the first of: the fused key ``experts.<name>`` (row e),
a per-expert key ``experts.<e>.<name>``, or a rank-local ``experts.slots.<name>`` whose
``logical_ids`` hold e. A missing expert raises ``MissingExpertWeights`` naming it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import DistributedError

__all__ = ["SlotExperts", "MissingExpertWeights", "load_checkpoint"]


class MissingExpertWeights(DistributedError):
    """A checkpoint lacks (or has a wrongly shaped) weight of an expert this rank's plan slots hold."""


class SlotExperts(nn.Module):
    """This rank's routed expert weights, [S_local, ...] per parameter, named as in one process.

    Args:
        slot_experts: [S_local] logical expert of each local slot (slot order).
        first_slot: physical id of the first local slot (rank * slots_per_gpu).
        num_experts: E, rows of a fused full checkpoint tensor.
        rank: for messages.
    """

    def __init__(self, slot_experts: Sequence[int], first_slot: int, num_experts: int, rank: int):
        super().__init__()
        self.slot_experts = [int(e) for e in slot_experts]
        self.first_slot = int(first_slot)
        self.num_experts = int(num_experts)
        self.rank = int(rank)
        # ``load_state_dict``'s strict (torch passes every module strict=True and filters afterwards): set by the
        # expert-parallel layer's own load_state_dict; None (loaded as part of a larger model) lists the missing
        # experts' keys, and torch's strict check names them
        self.strict_load: bool | None = None

    @classmethod
    def adopt(cls, experts: nn.Module, slot_experts: Sequence[int], first_slot: int, num_experts: int,
              rank: int) -> SlotExperts:
        """Take over the parameters of the generated layer's ``experts`` module (same names and order)."""
        new = cls(slot_experts, first_slot, num_experts, rank)
        for name, p in experts.named_parameters(recurse=False):
            new.register_parameter(name, p)
        return new

    def extra_repr(self) -> str:
        return f"rank={self.rank}, slots={self.first_slot}..{self.first_slot + len(self.slot_experts) - 1}, " \
               f"experts={self.slot_experts}"

    # ------------------------------------------------------------------ state dict

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, p in self._parameters.items():
            if p is not None:
                destination[prefix + "slots." + name] = p if keep_vars else p.detach()
        destination[prefix + "slots.logical_ids"] = torch.tensor(self.slot_experts, dtype=torch.int64)
        n = len(self.slot_experts)
        destination[prefix + "slots.physical_ids"] = torch.arange(self.first_slot, self.first_slot + n)

    def _find(self, state_dict, prefix: str, name: str, e: int, used: set[str]):
        fused = state_dict.get(prefix + name)
        if fused is not None:
            if fused.dim() == 0 or fused.shape[0] != self.num_experts:
                raise MissingExpertWeights(
                    f"checkpoint key '{prefix}{name}' has shape {list(fused.shape)}: a fused expert tensor needs "
                    f"{self.num_experts} rows (one per expert of the spec); is the checkpoint for another spec?"
                )
            used.add(prefix + name)
            return fused[e]
        key = f"{prefix}{e}.{name}"
        if key in state_dict:
            used.add(key)
            return state_dict[key]
        ids = state_dict.get(prefix + "slots.logical_ids")
        local = state_dict.get(prefix + "slots." + name)
        if ids is not None and local is not None:
            hit = (torch.as_tensor(ids).reshape(-1) == e).nonzero()
            if len(hit):
                used.add(prefix + "slots." + name)
                return local[int(hit[0, 0])]
        return None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        used: set[str] = set()
        for name, p in self._parameters.items():
            rows, missing = {}, []
            for slot, e in enumerate(self.slot_experts):
                t = self._find(state_dict, prefix, name, e, used)
                if t is None:
                    missing.append(e)
                    continue
                if tuple(t.shape) != tuple(p.shape[1:]):
                    raise MissingExpertWeights(
                        f"checkpoint weight '{name}' of expert {e} has shape {list(t.shape)} but rank {self.rank}'s "
                        f"layer needs {list(p.shape[1:])}; is the checkpoint for another spec?"
                    )
                rows[slot] = t
            if missing:
                why = (f"checkpoint has no '{name}' weights for expert(s) {missing}, which the plan places on rank "
                       f"{self.rank} (slots {self.first_slot}..{self.first_slot + len(self.slot_experts) - 1}); "
                       f"looked for '{prefix}{name}' [E, ...], '{prefix}<e>.{name}' and '{prefix}slots.{name}' "
                       f"with '{prefix}slots.logical_ids'. Load a checkpoint holding every expert (the "
                       f"single-process layer's state_dict, or full_state_dict() of an expert-parallel layer)")
                if self.strict_load:
                    raise MissingExpertWeights(why)
                if self.strict_load is None:  # part of a larger module's load: torch names the keys, this says why
                    warnings.warn(why, stacklevel=2)
                missing_keys.extend(f"{prefix}{e}.{name}" for e in sorted(set(missing)))
            with torch.no_grad():  # the slots found (all of them, unless the load is not strict)
                for slot, t in rows.items():
                    p[slot].copy_(t.to(p.device, p.dtype))
        for k in state_dict:
            if k.startswith(prefix) and k not in used and not self._recognised(k[len(prefix):]):
                unexpected_keys.append(k)

    def _recognised(self, rest: str) -> bool:
        """A key (below this module) that one of the accepted checkpoint forms uses."""
        head, _, name = rest.rpartition(".")
        if name in ("logical_ids", "physical_ids"):
            return head == "slots"
        return name in self._parameters and (head in ("", "slots") or head.isdigit())


def load_checkpoint(layer: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load a single-process checkpoint file into an expert-parallel layer, reading only what it needs.

    ``.safetensors`` files are read lazily: of each fused expert tensor only the rows of this rank's
    experts are read. Other files go through ``torch.load``. Returns ``layer``.
    """
    p = Path(path)
    if not p.exists():
        raise MissingExpertWeights(f"{p}: checkpoint file not found")
    experts = layer.experts
    if p.suffix != ".safetensors":
        layer.load_state_dict(torch.load(p, map_location="cpu", weights_only=True), strict=strict)
        return layer
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - safetensors is a test dependency
        raise MissingExpertWeights(f"{p}: reading .safetensors needs the safetensors package (pip install "
                                   "safetensors)") from None
    wanted = sorted(set(getattr(experts, "slot_experts", range(getattr(layer, "NUM_EXPERTS", 0)))))
    names = set(dict(experts.named_parameters(recurse=False)))
    sd = {}
    with safe_open(str(p), framework="pt", device="cpu") as f:
        for k in f.keys():
            name = k[len("experts."):] if k.startswith("experts.") else None
            if name in names:
                sl = f.get_slice(k)
                rows = sl.get_shape()[0]
                if rows != experts.num_experts:
                    sd[k] = f.get_tensor(k)  # wrong size: let the loader report it
                    continue
                for e in wanted:
                    sd[f"experts.{e}.{name}"] = sl[e : e + 1][0]
            else:
                sd[k] = f.get_tensor(k)
    layer.load_state_dict(sd, strict=strict)
    return layer
