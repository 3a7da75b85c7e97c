"""Expert activations: one table entry per activation, an elementwise expression of the up projection.

A spec names an entry of ``ACTIVATIONS`` or writes the expression inline (``activation: "(clamp(up,
-7, 7) + 1) * clamp(gate, max=7) * sigmoid(1.702 * clamp(gate, max=7))"``); ``activation()`` turns
either into an entry, so every backend treats both alike.

A gated activation is an expression of ``gate`` and ``up`` (the two halves of the up projection,
after the spec's optional ``gate_clamp``/``up_clamp``); a plain one is an expression of ``x``.
Everything a backend needs is derived from the entry's expression: the torch forward
(``moegraph.semantics.torch_forms``), its derivatives d/dgate and d/dup (symbolic, from the tree),
the Triton kernel's body, and the spec's list of valid names.

``fast`` marks the built-ins the expert op also runs through hand-fused in-place torch forms
(``moegraph.ops``); a test checks each fast form against the entry's expression. ``elementwise``
is the name HF gives the function of a built-in (``silu`` for ``swiglu``), used by the importer.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from dataclasses import dataclass

import moegraph.semantics.expr as _expr

__all__ = ["Activation", "ACTIVATIONS", "register_activation", "activation", "is_inline", "ACTIVATION_LANGUAGE"]

_PROBE = tuple((g, u, x) for g in (-30.0, -4.0, -1.0, 0.0, 0.5, 3.0, 30.0) for u in (-30.0, -1.0, 0.0, 2.0, 30.0)
               for x in (g,))

ACTIVATION_LANGUAGE = _expr.Language(
    what="activation expression", variables=("gate", "up", "x"), functions=(*_expr.CALLABLE, *_expr.SUGAR),
    max_length=300,
    of="gate and up (gated) or of x (plain)", names_hint="'gate' and 'up' (gated) or 'x' (plain)",
    uses_hint="'gate'/'up' or 'x'", example="silu(gate) * up", probe=_PROBE,
    probe_hint="an activation must be finite for ordinary inputs; guard it (e.g. sqrt(x) -> sqrt(relu(x)))",
)


@dataclass(frozen=True)
class Activation:
    """One expert activation: ``expression`` of gate and up (``gated``) or of x; see the module docstring."""

    name: str
    expression: str
    gated: bool
    elementwise: str | None = None
    fast: bool = False

    @functools.cached_property
    def tree(self) -> ast.Expression:
        return _expr.parse(self.expression, ACTIVATION_LANGUAGE)

    @property
    def variables(self) -> tuple[str, ...]:
        return ("gate", "up") if self.gated else ("x",)

    @functools.cached_property
    def grads(self) -> tuple[ast.Expression, ...]:
        """d expression / d v for each variable (gate, up; or x), derived symbolically."""
        return tuple(_expr.derivative(self.tree, v) for v in self.variables)

    @functools.cached_property
    def forward_program(self) -> _expr.Program:
        return _expr.program([self.tree])

    @functools.cached_property
    def backward_program(self) -> _expr.Program:
        """The value and every derivative in one program (shared subexpressions computed once)."""
        return _expr.program([self.tree, *self.grads])


def _checked(name: str, expression: str, gated: bool | None) -> Activation:
    tree = _expr.parse(expression, ACTIVATION_LANGUAGE)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in ACTIVATION_LANGUAGE.variables}
    is_gated = bool(used & {"gate", "up"})
    if is_gated and "x" in used:
        raise ValueError(f"activation {name!r}: expression {expression!r} mixes 'x' with 'gate'/'up'; a gated "
                         "activation is written in gate and up, a plain one in x")
    if gated is not None and gated != is_gated:
        raise ValueError(f"activation {name!r}: expression {expression!r} is {'gated' if is_gated else 'plain'} "
                         f"but gated={gated} was given")
    entry = Activation(name, expression, is_gated)
    zero = ast.Constant(0.0)
    if not used or all(ast.dump(g.body) == ast.dump(zero) for g in entry.grads):
        # Constant in its inputs (e.g. 'gate * 0 + 1'): every expert would return one fixed vector, and
        # the kernels would get a scalar where they expect a tile. Certainly not what was meant.
        raise ValueError(f"activation {name!r}: expression {expression!r} does not depend on "
                         f"{' or '.join(entry.variables)} (it folds to a constant); write the activation in its inputs")
    if is_gated and not {"gate", "up"} <= used:
        # Gated means an up projection twice as wide (gate and up halves): a half the expression never reads
        # would be parameters and FLOPs for nothing, with a zero gradient.
        only, other = ("gate", "up") if "gate" in used else ("up", "gate")
        plain = ast.unparse(_rename(ast.parse(expression, mode="eval"), only, "x"))  # as written (clamps kept)
        raise ValueError(f"activation {name!r}: expression {expression!r} uses {only} but not {other}; a gated "
                         f"activation is written in both (e.g. silu(gate) * up); for a plain one write it in x "
                         f"({plain!r})")
    # The expert op's backward evaluates the derivatives: one infinite or undefined at an ordinary input (the
    # slope of sqrt(clamp(x, min=0)) at x = 0) would make every gradient of the training step NaN.
    for point in ACTIVATION_LANGUAGE.probe:
        env = dict(zip(ACTIVATION_LANGUAGE.variables, point))
        for var, grad in zip(entry.variables, entry.grads):
            if not _expr.finite(grad, env):
                raise ValueError(
                    f"activation {name!r}: expression {expression!r} has no finite derivative d/d{var} at "
                    f"{_expr.at(entry.tree, env)} (training would get NaN gradients); guard it so its slope stays "
                    "finite, e.g. sqrt(clamp(x, min=0)) -> sqrt(relu(x)) (slope 0 at x <= 0) or sqrt(relu(x) + 1e-6)")
    return entry


def _rename(tree: ast.AST, old: str, new: str) -> ast.AST:
    """``tree`` with the variable ``old`` named ``new``."""
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and n.id == old:
            n.id = new
    return tree


#: spec activation name -> its entry
ACTIVATIONS: dict[str, Activation] = {
    "swiglu": Activation("swiglu", "silu(gate) * up", True, "silu", fast=True),
    "geglu": Activation("geglu", "gelu(gate) * up", True, "gelu"),
    "geglu_tanh": Activation("geglu_tanh", "gelu_tanh(gate) * up", True, "gelu_tanh"),
    "reglu": Activation("reglu", "relu(gate) * up", True, "relu", fast=True),
    "silu": Activation("silu", "silu(x)", False, "silu", fast=True),
    "gelu": Activation("gelu", "gelu(x)", False, "gelu"),
    "gelu_tanh": Activation("gelu_tanh", "gelu_tanh(x)", False, "gelu_tanh"),
    "relu": Activation("relu", "relu(x)", False, "relu", fast=True),
    "relu2": Activation("relu2", "relu(x) ** 2", False, "relu2", fast=True),
}


#: other libraries' names of an elementwise activation (transformers' ACT2FN keys) -> the name here
OTHER_NAMES: dict[str, str] = {"swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                               "gelu_fast": "gelu_tanh", "relu_squared": "relu2", "squared_relu": "relu2"}


def register_activation(name: str, expression: str, *, elementwise: str | None = None) -> Activation:
    """Add an activation to the table (gated if the expression uses gate/up); returns its entry.

    The name becomes a valid ``moe.experts.activation`` and reaches every backend through the
    entry's expression. Re-registering a name with the same expression is a no-op.
    """
    if not name.isidentifier():
        raise ValueError(f"activation name {name!r} is not an identifier; use letters, digits and '_'")
    entry = _checked(name, expression, None)
    entry = Activation(name, expression, entry.gated, elementwise)
    old = ACTIVATIONS.get(name)
    if old is not None and (old.expression, old.gated) != (entry.expression, entry.gated):
        raise ValueError(f"activation {name!r} is already defined as {old.expression!r}; pick another name")
    ACTIVATIONS.setdefault(name, entry)
    return ACTIVATIONS[name]


def is_inline(name: str) -> bool:
    """Whether a spec's activation is an inline expression rather than a table name."""
    return not name.isidentifier()


@functools.lru_cache(maxsize=256)
def _inline(expression: str) -> Activation:
    # A plain-word name (for generated comments and tuning keys); the op and spec carry the expression.
    name = "expr_" + hashlib.sha1(expression.encode()).hexdigest()[:10]
    return Activation(name, expression, _checked("(inline)", expression, None).gated)


def activation(name: str, gated: bool | None = None) -> Activation:
    """The entry for a spec activation: a table name or an inline expression of gate and up (or of x).

    Also accepts an elementwise name with ``gated`` (``("silu", True)`` is swiglu), the form older
    callers of the expert op pass. Raises ValueError naming the problem and the fix.
    """
    entry = ACTIVATIONS.get(name)
    if entry is None and is_inline(name):
        entry = _inline(name)
        if gated is not None and entry.gated != bool(gated):
            raise ValueError(f"activation expression {name!r} is {'gated' if entry.gated else 'plain'} but "
                             f"gated={bool(gated)} was given")
        return entry
    if entry is not None and (gated is None or entry.gated == bool(gated)):
        return entry
    for e in ACTIVATIONS.values():
        if e.elementwise == name and e.gated == bool(gated):
            return e
    raise ValueError(f"unknown activation {name!r}" + ("" if gated is None else f" (gated={bool(gated)})")
                     + f"; use one of {', '.join(ACTIVATIONS)}")
