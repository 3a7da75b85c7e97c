"""The expert op's arguments as frozen objects: what crosses the boundaries between the op, its
strategies, the tuner and the Triton backend. The positional form exists only where
``torch.library`` needs it (the op schemas in ``moegraph.ops``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor

from .. import semantics

__all__ = ["ExpertArgs", "RoutedRows", "SavedForward"]


@dataclass(frozen=True, eq=False)
class ExpertArgs:
    """The arguments of ``moegraph::expert_mlp`` (shapes and meaning: ``moegraph.ops.expert_mlp``)."""

    x_TD: Tensor
    tok_N: Tensor
    exp_N: Tensor
    weight_N: Tensor
    w_up_EHD: Tensor
    w_down_EDF: Tensor
    b_up_EH: Tensor | None = None
    b_down_ED: Tensor | None = None
    activation: str = "swiglu"
    gated: bool = True
    gate_clamp: float | None = None
    up_clamp: float | None = None
    shared_w_up_HD: Tensor | None = None
    shared_w_down_DF: Tensor | None = None
    shared_scale_T: Tensor | None = None

    @classmethod
    def of(cls, *args: Any) -> ExpertArgs:
        """An ``ExpertArgs`` as given, or built from the op's positional arguments (or their tuple)."""
        if len(args) == 1 and isinstance(args[0], cls):
            return args[0]
        if len(args) == 1 and isinstance(args[0], tuple):
            args = args[0]
        return cls(*args)

    def positional(self) -> tuple:
        """The fields in the op schema's order."""
        return tuple(getattr(self, f.name) for f in fields(self))

    @property
    def act(self) -> semantics.Activation:
        """The activation's table entry."""
        return semantics.activation(self.activation, self.gated)

    @property
    def activation_args(self) -> tuple:
        """(activation, gated, gate_clamp, up_clamp), as the activation helpers take them."""
        return self.activation, self.gated, self.gate_clamp, self.up_clamp


@dataclass(frozen=True, eq=False)
class RoutedRows:
    """The routed part of the backward: rows sorted by expert and what their gradients need.

    x_ND, gy_ND [n, D]: inputs and output gradients of the kept assignments, sorted by expert;
    w_sorted [n, 1] their routing weights; exp_sorted [n] their experts; counts: rows per expert
    (E ints); the expert weights and activation as in ``ExpertArgs``; want_out: also compute the
    per-assignment weight gradient.
    """

    x_ND: Tensor
    gy_ND: Tensor
    w_sorted: Tensor
    exp_sorted: Tensor
    counts: list[int]
    w_up_EHD: Tensor
    w_down_EDF: Tensor
    b_up_EH: Tensor | None
    b_down_ED: Tensor | None
    activation: str
    gated: bool
    gate_clamp: float | None
    up_clamp: float | None
    want_out: bool
    h_ND: Tensor | None = None  # the forward's up projection (bias included) of these rows, when it kept it
    want_x: bool = True  # compute the input gradient (not when the op's input needs none)

    @property
    def activation_args(self) -> tuple:
        return self.activation, self.gated, self.gate_clamp, self.up_clamp


@dataclass(frozen=True, eq=False)
class SavedForward:
    """What a training forward of the expert op keeps for its backward, so the backward neither sorts
    the assignments again nor recomputes the up projection (two thirds of a gated MLP's forward GEMMs).

    order_N [n] kept assignments by expert, exp_sorted [n] their experts, counts rows per expert (E ints),
    tok_sorted [n] their tokens, x_ND [n, D] their input rows, h_ND [n, H] the up projection of those
    rows with bias, before the activation.
    """

    order_N: Tensor
    exp_sorted: Tensor
    counts: list[int]
    tok_sorted: Tensor
    x_ND: Tensor
    h_ND: Tensor
