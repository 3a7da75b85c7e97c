"""Router score functions: the named scores and custom score expressions of the router logit ``x``.

A score is ``softmax`` (over experts; the one score that is not elementwise) or an elementwise
expression of ``x`` in the language of ``moegraph.semantics.expr``. Named scores are entries of
``SCORE_FUNCTIONS``; adding one there makes it a valid ``moe.router.score`` for every backend (the
generated torch code, the Triton router, the torch reference routing and the HF importer).
"""

from __future__ import annotations

import ast
import functools
from typing import Any

import moegraph.semantics.expr as _expr
from moegraph.errors import close_names

__all__ = ["SCORE_FUNCTIONS", "SCORE_EXPR_FUNCTIONS", "SCORE_EXPR_MATH", "MAX_SCORE_EXPRESSION", "SCORE_PROBE_X",
           "score_tree", "score_value", "emit_score", "check_score", "score_expression", "score_can_be_negative",
           "negative_score_words"]

#: named score functions -> elementwise expression of the router logit ``x`` ("softmax" is special)
SCORE_FUNCTIONS: dict[str, str] = {
    "softmax": "softmax",
    "sigmoid": "sigmoid(x)",
    "softplus": "softplus(x)",
    "sqrt_softplus": "sqrt(softplus(x))",
    "tanh": "tanh(x)",
    "identity": "x",
}

#: the functions a score expression may call
SCORE_FUNCTION_NAMES = ("sigmoid", "softplus", "sqrt", "exp", "log", "log1p", "tanh", "relu", "abs", "square")

#: functions allowed inside a custom score expression, mapped to their torch spelling
SCORE_EXPR_FUNCTIONS: dict[str, str] = {n: _expr.FUNCTIONS[n].torch.replace("({})", "") for n in SCORE_FUNCTION_NAMES}

#: the meaning of each function of SCORE_EXPR_FUNCTIONS on one Python float (the finiteness probe, and
#: constant folding in the Triton backend)
SCORE_EXPR_MATH: dict[str, Any] = {n: _expr.FUNCTIONS[n].math for n in SCORE_FUNCTION_NAMES}

#: longest custom score expression accepted (also keeps the parser away from pathological inputs)
MAX_SCORE_EXPRESSION = 200

#: router logits at which a custom score must be finite (float32): the range logits take in practice
SCORE_PROBE_X = tuple(v / 4 for v in range(-120, 121))

SCORE_LANGUAGE = _expr.Language(
    what="score expression", variables=("x",), functions=SCORE_FUNCTION_NAMES, max_length=MAX_SCORE_EXPRESSION,
    of="x", names_hint="the logit 'x'", uses_hint="the router logit 'x'", example="sigmoid(x)",
    probe=tuple((x,) for x in SCORE_PROBE_X), point_words="the logit ",
    probe_hint=(f"a score must be finite for every logit in [{SCORE_PROBE_X[0]:g}, {SCORE_PROBE_X[-1]:g}] "
                "(guard it, e.g. log(1 + exp(x)) -> softplus(x), sqrt(x) -> sqrt(relu(x)))"),
)


@functools.lru_cache(maxsize=256)
def score_tree(expr: str) -> ast.Expression:
    """The parsed tree of a custom score expression, validated (allowed names, calls, operators and
    constants only; finite on every logit of ``SCORE_PROBE_X``; not constant in x). Code is generated from this
    tree, never from the expression's text."""
    tree = _expr.parse(expr, SCORE_LANGUAGE)
    d = _expr.derivative(tree, "x").body
    if isinstance(d, ast.Constant) and d.value == 0:
        # 'x * 0 + 1': every expert scores alike, so every token picks the same experts and the router never learns
        raise ValueError(f"score expression {expr!r} does not depend on x (it folds to a constant): every token "
                         "would pick the same experts; write the score in the router logit x, e.g. sigmoid(x)")
    return tree


def score_value(tree: ast.AST, x: float) -> float:
    """A validated score expression tree at one logit value (Python floats; raises ArithmeticError or
    ValueError where the expression is undefined)."""
    return _expr.value(tree, {"x": x})


def emit_score(tree: ast.AST, x: str, call: Any, special: Any = None) -> str:
    """Source text for a score expression tree, built node by node (never from the expression's text).

    ``x`` spells the logit; ``call(name, arg)`` spells a function call; ``special(node, emit)`` may
    spell a node its own way (return None for the default). Operators are fully parenthesised.
    """
    return _expr.emit(tree, {"x": x}, call, special)


def check_score(v: str) -> str:
    """A score name or custom expression, validated; returned unchanged (ValueError otherwise)."""
    if v in SCORE_FUNCTIONS:
        return v
    if v.isidentifier() or v.strip() in SCORE_FUNCTIONS:  # (a padded name is no expression either)
        close = close_names(v, SCORE_FUNCTIONS)
        hint = f"did you mean '{close[0]}'? Otherwise " if close else ""
        raise ValueError(
            f"unknown score function {v!r}; {hint}use one of {sorted(SCORE_FUNCTIONS)} or an expression of x "
            f"such as 'sqrt(softplus(x))'"
        )
    score_tree(v)
    return v


#: pieces of the logit range ``score_can_be_negative`` bounds before it gives up (a score it can neither prove
#: non-negative nor find negative within them is taken as one that can be negative)
SIGN_PIECES = 2048


@functools.lru_cache(maxsize=256)
def _negative_logit(score: str) -> tuple[bool, float | None]:
    """(whether the score may be negative on the logit range of ``SCORE_PROBE_X``, a logit where it is)."""
    if score == "softmax":
        return False, None
    tree = score_tree(score_expression(score))
    for x in SCORE_PROBE_X:  # (finite there: validated)
        if score_value(tree, x) < 0:
            return True, x
    pieces = [(SCORE_PROBE_X[0], SCORE_PROBE_X[-1])]
    for _ in range(SIGN_PIECES):
        if not pieces:
            return False, None
        lo, hi = pieces.pop()
        if _expr.bounds(tree, {"x": (lo, hi)})[0] >= 0:
            continue
        mid = (lo + hi) / 2
        try:
            if score_value(tree, mid) < 0:
                return True, mid
        except (ArithmeticError, ValueError):
            pass
        pieces += [(lo, mid), (mid, hi)]
    return bool(pieces), None


def score_can_be_negative(score: str) -> bool:
    """Whether a (validated) score name or expression can be negative for a logit in the range of
    ``SCORE_PROBE_X`` (the logits every score is checked finite on): then the scores of a token are no
    distribution of its load, normalize may divide by a sum near zero, and the balance losses, which share each
    token among the experts by its scores, are not bounded below. Softmax never is.

    Sound: a negative value at a sample logit (the grid, then the midpoints of the pieces below) says yes;
    interval bounds of the expression tree (``expr.bounds``) that are >= 0 over every piece of the range,
    bisected where a bound is not yet, say no. Where neither settles it within ``SIGN_PIECES`` pieces (a least
    value of exactly 0 that interval arithmetic cannot see, as in ``abs(x) - x``) the answer is yes: its callers
    then refuse normalize and the balance losses, which the user answers by writing the score so that its
    sign shows (``2 * relu(-x)``); a loss without a lower bound would only show in training. The named scores
    and scores built of non-negative parts (sigmoid, softplus, exp, relu, abs, square, sqrt) are proven at once.
    """
    return _negative_logit(score)[0]


def negative_score_words(score: str) -> str:
    """How a score that ``score_can_be_negative`` says can be negative is, in words for messages."""
    can, x = _negative_logit(score)
    assert can, f"score {score!r} is never negative"
    if x is not None:
        v = score_value(score_tree(score_expression(score)), x)
        return f"is negative for some logits ({v:.3g} at x = {x:g})"
    return (f"cannot be shown to be >= 0 for every logit in [{SCORE_PROBE_X[0]:g}, {SCORE_PROBE_X[-1]:g}] (its "
            "interval bounds do not settle it)")


def score_expression(score: str) -> str:
    """The elementwise expression of ``x`` for a score name or custom expression ('softmax' stays as is)."""
    return SCORE_FUNCTIONS.get(score, score)


def torch_score_code(score: str, logits: str) -> str:
    """Generated torch code computing the scores from the logits spelled ``logits``."""
    if score == "softmax":
        return f"torch.softmax({logits}, dim=-1)"
    tree = score_tree(score_expression(score))
    code = emit_score(tree, logits, lambda name, arg: _expr.FUNCTIONS[name].torch.format(arg))
    # Keep the hand-written look: an operator at the top needs no outer parentheses.
    return code[1:-1] if isinstance(tree.body, (ast.BinOp, ast.UnaryOp)) else code


def register_score(name: str, expression: str) -> str:
    """Add a named score (an expression of ``x``) to ``SCORE_FUNCTIONS``; returns the name.

    The name becomes a valid ``moe.router.score`` on every backend. Re-registering a name with the
    same expression is a no-op.
    """
    if not name.isidentifier():
        raise ValueError(f"score name {name!r} is not an identifier; use letters, digits and '_'")
    score_tree(expression)
    old = SCORE_FUNCTIONS.get(name)
    if old is not None and old != expression:
        raise ValueError(f"score {name!r} is already defined as {old!r}; pick another name")
    SCORE_FUNCTIONS[name] = expression
    return name
