"""The torch forms of the semantics: expression programs evaluated on tensors, activations forward
and backward (from the table entry's expression and its symbolic derivatives), scores, and the RMS
norms of the experts' space (``spec.ExpertNorm``).

Differentiable by autograd as well (every step is a torch op), which the layers' shared-expert
path relies on in training.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import moegraph.semantics.expr as _expr
from .activations import Activation, activation
from .scores import score_expression, score_tree

__all__ = ["TORCH_FUNCTIONS", "run_program", "activate", "activate_saved", "activate_backward", "scores", "rms_norm"]

#: function name -> torch callable (the meaning of ``expr.FUNCTIONS`` on tensors)
TORCH_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "sqrt": torch.sqrt,
    "exp": torch.exp,
    "log": torch.log,
    "log1p": torch.log1p,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "abs": torch.abs,
    "square": torch.square,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda u: F.gelu(u, approximate="tanh"),
    "erf": torch.erf,
    "step": lambda u: (u > 0).to(u.dtype),
    "sign": torch.sign,
    "min": lambda a, b: _two(torch.minimum, torch.clamp, "max", a, b),
    "max": lambda a, b: _two(torch.maximum, torch.clamp, "min", a, b),
    "_masked_mul": lambda u, v: torch.where(v == 0, 0.0, u * v) if isinstance(v, Tensor) else u * v,
}


def _two(both: Callable, clamp: Callable, side: str, a: Any, b: Any) -> Tensor:
    """min/max of a tensor and a tensor or number (a clamp's bound is a Python float here)."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return both(a, b)
    t, c = (a, b) if isinstance(a, Tensor) else (b, a)
    return clamp(t, **{side: float(c)})


def _call(name: str, *vs: Any) -> Any:
    if any(isinstance(v, Tensor) for v in vs):
        return TORCH_FUNCTIONS[name](*vs)
    return _expr.FUNCTIONS[name].math(*vs)


def _binop(op: str, a: Any, b: Any) -> Any:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a / b
    return a ** b


def run_program(prog: _expr.Program, env: dict[str, Any]) -> list[Any]:
    """The program's outputs on tensors (constants stay Python floats until they meet a tensor)."""
    return prog.run(env, _call, _binop)


def _as_tensor(v: Any, like: Tensor) -> Tensor:
    return v if isinstance(v, Tensor) else torch.full_like(like, float(v))


def _halves(h: Tensor, act: Activation, gate_clamp: float | None, up_clamp: float | None):
    f = h.shape[-1] // 2
    g, u = h[..., :f], h[..., f:]
    gc = g if gate_clamp is None else g.clamp(max=gate_clamp)
    uc = u if up_clamp is None else u.clamp(min=-up_clamp, max=up_clamp)
    return g, u, gc, uc


def activate(h: Tensor, act: Activation | str, gated: bool | None = None, gate_clamp: float | None = None,
             up_clamp: float | None = None) -> Tensor:
    """The activation of the up projection ``h`` ([rows, 2F] gated: gate then up halves; else [rows, F])."""
    act = act if isinstance(act, Activation) else activation(act, gated)
    if not act.gated:
        (a,) = run_program(act.forward_program, {"x": h})
        return _as_tensor(a, h)
    _, _, gc, uc = _halves(h, act, gate_clamp, up_clamp)
    (a,) = run_program(act.forward_program, {"gate": gc, "up": uc})
    return _as_tensor(a, gc)


def activate_saved(h: Tensor, act: Activation, gate_clamp: float | None, up_clamp: float | None):
    """The activation of ``h`` [rows, H] and what its backward needs: returns (a [rows, F], saved)."""
    if not act.gated:
        a, da = run_program(act.backward_program, {"x": h})
        return _as_tensor(a, h), (_as_tensor(da, h),)
    g, u, gc, uc = _halves(h, act, gate_clamp, up_clamp)
    a, dg, du = (_as_tensor(v, gc) for v in run_program(act.backward_program, {"gate": gc, "up": uc}))
    # Where a clamp is active the input does not move the output.
    if gate_clamp is not None:
        dg = dg * (g <= gate_clamp)
    if up_clamp is not None:
        du = du * ((u >= -up_clamp) & (u <= up_clamp))
    return a, (dg, du)


def activate_backward(ga: Tensor, saved: tuple) -> Tensor:
    """d loss / d h [rows, H] from d loss / d a [rows, F] and ``activate_saved``'s saved derivatives."""
    if len(saved) == 1:
        return ga * saved[0]
    dg, du = saved
    return torch.cat([ga * dg, ga * du], dim=-1)


def scores(logits_TE: Tensor, score: str) -> Tensor:
    """Router scores [T, E] from logits for a score name or expression (as the generated layer computes them)."""
    if score == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    prog = _score_program(score)
    (s,) = run_program(prog, {"x": logits_TE})
    return _as_tensor(s, logits_TE)


_SCORE_PROGRAMS: dict[str, _expr.Program] = {}


def _score_program(score: str) -> _expr.Program:
    prog = _SCORE_PROGRAMS.get(score)
    if prog is None:
        prog = _SCORE_PROGRAMS[score] = _expr.program([score_tree(score_expression(score))])
    return prog


def rms_norm(v_TM: Tensor, eps: float, weight_M: Tensor | None, offset: float = 0.0, before: bool = False) -> Tensor:
    """``spec.ExpertNorm`` on [..., M] rows: ``rms(v) * (offset + weight)`` in float32, or with ``before``
    ``rms(v * (offset + weight))`` (the scaled input rounded to v's dtype first, as an input-scaled norm
    rounds it); the result has v's dtype. Differentiable by autograd."""
    vf = v_TM.float()
    w_M = None if weight_M is None else (weight_M.float() + offset if offset else weight_M.float())
    if w_M is not None and before:
        vf = (vf * w_M).to(v_TM.dtype).float()
    vf = vf * torch.rsqrt(vf.pow(2).mean(-1, keepdim=True) + eps)
    if w_M is not None and not before:
        vf = vf * w_M
    return vf.to(v_TM.dtype)
