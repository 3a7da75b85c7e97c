"""The small elementwise expression language shared by score functions and expert activations.

An expression is parsed once (Python's ``ast`` in ``mode="eval"``, then checked: only the
language's variables, calls of its functions, numeric constants and + - * / **; every part that
reads no variable is folded to the number it is), and everything else is derived from that tree:
its value on Python floats, source code for generated torch and Triton code (``emit``), its
symbolic derivative (``derivative``), and a straight-line ``Program`` with common subexpressions
computed once (what the torch evaluator and the Triton expert kernel run). No backend reads the
expression's text.

Each function of ``FUNCTIONS`` says, in one entry, what it means on a float, how generated torch
code and Triton code spell it, and its derivative as an expression of its argument ``u`` (and, for
the two-argument ``min``/``max``, of ``v``). ``clamp(v, lo, hi)``, ``clamp(v, max=hi)`` and
``clamp(v, min=lo)`` are spelled with them: the parser rewrites a clamp into ``min``/``max`` calls
with the meaning and derivative of ``torch.clamp`` (at a tie the input keeps the gradient), while a
``min``/``max`` of two tensors splits the gradient at a tie evenly, as ``torch.minimum``/``maximum`` do.

The chain rule follows torch autograd where a derivative is infinite: a factor that can be infinite
(``d sqrt(u) = 0.5 / sqrt(u)`` at u = 0) times an inner derivative that is 0 there (``relu``, a clamp)
is 0, not inf * 0 = NaN, as torch's relu and clamp backwards mask the gradient rather than multiply it
(``_masked_mul``, a function derivatives use and expressions may not). So ``sqrt(relu(x))`` has slope 0
at x <= 0.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Function", "FUNCTIONS", "INTERNAL", "CALLABLE", "C_SPELLINGS", "Language", "parse", "finite", "at",
           "value", "emit", "torch_call", "bounds", "derivative", "Program", "program", "constant"]


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= -700 else 0.0


@dataclass(frozen=True)
class Function:
    """One function of the language.

    ``math``: its value on a float; ``torch``: its spelling in generated torch code (a format string
    of the argument); ``triton``: its spelling in Triton kernels (the argument may be repeated, so
    callers pass a plain name or a parenthesised expression); ``grad``: d f(u) / du as an
    expression of ``u`` (None: zero almost everywhere); a two-argument function f(u, v) (``arity``
    2) also has ``grad2``, d f / dv, both as expressions of ``u`` and ``v``. ``clamp_grad`` (``min``/``max``):
    d f / du where ``v`` is a constant bound, which makes the call a clamp (torch.clamp runs it).
    ``shape`` and ``least`` bound its values over an interval (``bounds``): "rising" (non-decreasing in
    every argument), "even" (least at 0, rising away from it either side) or None (unknown); ``least`` is
    its least value anywhere (-inf: none known).
    """

    math: Callable[..., float]
    torch: str
    triton: str
    grad: str | None
    grad2: str | None = None
    arity: int = 1
    clamp_grad: str | None = None
    shape: str | None = None
    least: float = -math.inf


_GELU_GRAD = "0.5 * (1 + erf(u * 0.7071067811865476)) + u * exp(-0.5 * u * u) * 0.3989422804014327"
_GELU_TANH = "0.5 * u * (1 + tanh(0.7978845608028654 * (u + 0.044715 * u * u * u)))"
_GELU_TANH_GRAD = ("0.5 * (1 + tanh(0.7978845608028654 * (u + 0.044715 * u * u * u))) + 0.5 * u * "
                   "(1 - square(tanh(0.7978845608028654 * (u + 0.044715 * u * u * u)))) * 0.7978845608028654 * "
                   "(1 + 3 * 0.044715 * u * u)")

#: name -> meaning and spellings. Scores may use the functions of ``SCORE_FUNCTION_NAMES``
#: (``moegraph.semantics.scores``); activations may use all of them.
FUNCTIONS: dict[str, Function] = {
    "sigmoid": Function(_sigmoid, "torch.sigmoid({})", "tl.sigmoid({})", "sigmoid(u) * (1 - sigmoid(u))",
                        shape="rising", least=0.0),
    "softplus": Function(lambda v: v if v > 20 else math.log1p(math.exp(v)), "torch.nn.functional.softplus({})",
                         "_softplus({})", "sigmoid(u)", shape="rising", least=0.0),
    "sqrt": Function(math.sqrt, "torch.sqrt({})", "tl.sqrt({})", "0.5 / sqrt(u)", shape="rising", least=0.0),
    "exp": Function(math.exp, "torch.exp({})", "tl.exp({})", "exp(u)", shape="rising", least=0.0),
    "log": Function(math.log, "torch.log({})", "tl.log({})", "1 / u", shape="rising"),
    "log1p": Function(math.log1p, "torch.log1p({})", "_log1p({})", "1 / (1 + u)", shape="rising"),
    "tanh": Function(math.tanh, "torch.tanh({})", "_tanh({})", "1 - square(tanh(u))", shape="rising", least=-1.0),
    "relu": Function(lambda v: max(v, 0.0), "torch.relu({})", "tl.maximum({}, 0.0)", "step(u)", shape="rising",
                     least=0.0),
    "abs": Function(abs, "torch.abs({})", "tl.abs({})", "sign(u)", shape="even", least=0.0),
    "square": Function(lambda v: v * v, "torch.square({})", "(({0}) * ({0}))", "2 * u", shape="even", least=0.0),
    # Activation functions (not offered to score expressions).
    "silu": Function(lambda v: v * _sigmoid(v), "torch.nn.functional.silu({})", "(({0}) * tl.sigmoid({0}))",
                     "sigmoid(u) * (1 + u * (1 - sigmoid(u)))"),
    "gelu": Function(lambda v: 0.5 * v * (1.0 + math.erf(v * 0.7071067811865476)), "torch.nn.functional.gelu({})",
                     "(0.5 * ({0}) * (1.0 + tl.erf(({0}) * 0.7071067811865476)))", _GELU_GRAD),
    "gelu_tanh": Function(lambda v: 0.5 * v * (1.0 + math.tanh(0.7978845608028654 * (v + 0.044715 * v ** 3))),
                          "torch.nn.functional.gelu({}, approximate='tanh')",
                          "(0.5 * ({0}) * (1.0 + _tanh(0.7978845608028654 * (({0}) + 0.044715 * ({0}) * ({0}) * "
                          "({0})))))", _GELU_TANH_GRAD),
    "erf": Function(math.erf, "torch.erf({})", "tl.erf({})", "1.1283791670955126 * exp(-(u * u))", shape="rising",
                    least=-1.0),
    "step": Function(lambda v: 1.0 if v > 0 else 0.0, "torch.heaviside({0}, torch.zeros_like({0}))",
                     "tl.where(({0}) > 0, 1.0, 0.0)", None, shape="rising", least=0.0),
    "sign": Function(lambda v: float((v > 0) - (v < 0)), "torch.sign({})", "tl.where(({0}) > 0, 1.0, "
                     "tl.where(({0}) < 0, -1.0, 0.0))", None, shape="rising", least=-1.0),
    # Two arguments (clamps are written with these). At a tie of two tensors each gets half the gradient, as
    # torch.minimum / torch.maximum give it; against a constant bound (a clamp) the input gets all of it, as
    # torch.clamp's input does at its bound.
    "min": Function(min, "torch.minimum({0}, {1})", "tl.minimum({0}, {1})", "0.5 + 0.5 * sign(v - u)",
                    "0.5 + 0.5 * sign(u - v)", 2, clamp_grad="1 - step(u - v)", shape="rising"),
    "max": Function(max, "torch.maximum({0}, {1})", "tl.maximum({0}, {1})", "0.5 + 0.5 * sign(u - v)",
                    "0.5 + 0.5 * sign(v - u)", 2, clamp_grad="1 - step(v - u)", shape="rising"),
    # Derivatives only (not part of the language users write): u * v, but 0 where v is 0 even if u is
    # infinite or undefined there (the chain rule's product of an outer derivative u and an inner one v).
    "_masked_mul": Function(lambda u, v: 0.0 if v == 0 else u * v, "torch.where(({1}) == 0, 0.0, ({0}) * ({1}))",
                            "tl.where(({1}) == 0, 0.0, ({0}) * ({1}))", "v", "u", 2),
}

#: functions of FUNCTIONS that derivatives use but expressions may not call
INTERNAL = ("_masked_mul",)

#: the functions of FUNCTIONS an expression may call
CALLABLE = tuple(n for n in FUNCTIONS if n not in INTERNAL)

#: name -> its spelling in C (float arithmetic, <math.h>; the native decode kernel of
#: ``moegraph.native``), a format string of the arguments like ``Function.triton``. Every function of
#: FUNCTIONS has one (a test checks it against ``Function.math``).
C_SPELLINGS: dict[str, str] = {
    "sigmoid": "(1.0f / (1.0f + expf(-({0}))))",
    "softplus": "(({0}) > 20.0f ? ({0}) : log1pf(expf({0})))",
    "sqrt": "sqrtf({0})",
    "exp": "expf({0})",
    "log": "logf({0})",
    "log1p": "log1pf({0})",
    "tanh": "tanhf({0})",
    "relu": "(({0}) < 0.0f ? 0.0f : ({0}))",
    "abs": "fabsf({0})",
    "square": "(({0}) * ({0}))",
    "silu": "(({0}) / (1.0f + expf(-({0}))))",
    "gelu": "(0.5f * ({0}) * (1.0f + erff(({0}) * 0.70710678118654752f)))",
    "gelu_tanh": "(0.5f * ({0}) * (1.0f + tanhf(0.79788456080286536f * (({0}) + 0.044715f * ({0}) * ({0}) * ({0})))))",
    "erf": "erff({0})",
    "step": "(({0}) > 0.0f ? 1.0f : 0.0f)",
    "sign": "(({0}) > 0.0f ? 1.0f : (({0}) < 0.0f ? -1.0f : 0.0f))",
    "min": "(({1}) < ({0}) ? ({1}) : ({0}))",
    "max": "(({1}) > ({0}) ? ({1}) : ({0}))",
    "_masked_mul": "(({1}) == 0.0f ? 0.0f : ({0}) * ({1}))",
}

#: spellings the parser rewrites into calls of FUNCTIONS (clamp takes keywords, so is not one of them)
SUGAR = ("clamp",)

_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}
_ALLOWED_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.USub, ast.UAdd)
_FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class Language:
    """What an expression may use, and how messages about it read.

    ``what`` names it ("score expression"); ``variables`` and ``functions`` are what it may use;
    ``of`` / ``names_hint`` / ``uses_hint`` / ``example`` fill the messages; ``probe`` holds points (one
    value per variable) where it must be finite, ``point_words`` and ``probe_hint`` say where and how
    to guard it.
    """

    what: str
    variables: tuple[str, ...]
    functions: tuple[str, ...]
    max_length: int
    of: str
    names_hint: str
    uses_hint: str
    example: str
    probe: tuple[tuple[float, ...], ...] = ()
    point_words: str = ""
    probe_hint: str = ""


def parse(expr: str, lang: Language) -> ast.Expression:
    """The validated tree of ``expr`` in ``lang`` (raises ValueError naming the problem and the fix)."""
    what = lang.what
    if len(expr) > lang.max_length:
        raise ValueError(
            f"{what} is {len(expr)} characters long; keep it under {lang.max_length} "
            f"(it is one elementwise function of {lang.of})"
        )
    if not expr.isprintable():
        raise ValueError(f"{what} {expr!r} holds a line break or control character; write it on one line")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError) as exc:
        raise ValueError(f"{what} {expr!r} is not valid: {getattr(exc, 'msg', exc)}") from None
    except (RecursionError, MemoryError):
        raise ValueError(f"{what} {expr!r} is nested too deeply; simplify it") from None
    funcs = sorted(lang.functions)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if node.id not in lang.variables and node.id not in lang.functions:
                raise ValueError(
                    f"{what} {expr!r} uses unknown name {node.id!r}; use {lang.names_hint} and functions {funcs}"
                )
        elif isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in SUGAR and node.func.id in lang.functions:
                continue  # checked (and rewritten) by _desugar below
            if isinstance(node.func, ast.Name) and node.func.id not in lang.functions:
                raise ValueError(f"{what} {expr!r} calls unknown function {node.func.id!r}: it is one elementwise "
                                 f"function of {lang.of}, so only calls of {funcs} are allowed")
            if not isinstance(node.func, ast.Name) or node.func.id not in lang.functions or node.keywords:
                raise ValueError(f"{what} {expr!r}: only calls of {funcs} with positional arguments are allowed")
            n = FUNCTIONS[node.func.id].arity
            if len(node.args) != n or any(isinstance(a, ast.Starred) for a in node.args):
                takes = "exactly one argument" if n == 1 else f"exactly {n} arguments"
                got = "unpacked ones (*)" if any(isinstance(a, ast.Starred) for a in node.args) else len(node.args)
                raise ValueError(f"{what} {expr!r}: {node.func.id} takes {takes}, got {got}")
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float)) or isinstance(node.value, bool):
                raise ValueError(f"{what} {expr!r}: only numeric constants are allowed")
            if isinstance(node.value, int) and abs(node.value) > 2**53 or not math.isfinite(float(node.value)):
                raise ValueError(f"{what} {expr!r}: constant {expr[node.col_offset:node.end_col_offset]} "
                                 "is too large; use a number below 2**53")
        elif isinstance(node, (ast.BinOp, ast.UnaryOp)):
            if not isinstance(node.op, _ALLOWED_OPS):
                raise ValueError(f"{what} {expr!r}: operator {type(node.op).__name__} is not allowed")
        elif not isinstance(node, (ast.Expression, ast.Load, ast.keyword, *_ALLOWED_OPS)):
            raise ValueError(f"{what} {expr!r}: {type(node).__name__} is not allowed")
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    if any(isinstance(n, ast.Name) and n.id not in lang.variables and id(n) not in called for n in ast.walk(tree)):
        raise ValueError(f"{what} {expr!r}: functions must be called, e.g. {lang.example}")
    if not any(isinstance(n, ast.Name) and n.id in lang.variables for n in ast.walk(tree)):
        raise ValueError(f"{what} {expr!r} does not use {lang.uses_hint}")
    tree = ast.Expression(_literals(_desugar(tree.body, expr, what), expr, what))
    # Probe: an expression infinite or undefined for ordinary inputs makes every output non-finite.
    for point in lang.probe:
        env = dict(zip(lang.variables, point))
        if not finite(tree, env):
            raise ValueError(f"{what} {expr!r} is not finite at {lang.point_words}{at(tree, env)}; {lang.probe_hint}")
    return tree


def finite(tree: ast.AST, env: dict[str, float]) -> bool:
    """Whether a tree is defined and finite in float32 at one point."""
    try:
        return abs(value(tree, env)) <= _FLOAT32_MAX
    except (ArithmeticError, ValueError):
        return False


def at(tree: ast.AST, env: dict[str, float]) -> str:
    """A point spelled for messages ("x = 0"), the variables the tree uses only."""
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return ", ".join(f"{k} = {x:g}" for k, x in env.items() if k in used)


def _desugar(node: ast.AST, expr: str, what: str) -> ast.AST:
    """``node`` with every ``clamp(v, lo, hi)`` / ``clamp(v, min=lo)`` / ``clamp(v, max=hi)`` rewritten as
    ``min(max(v, lo), hi)`` (ValueError on a malformed clamp)."""
    if isinstance(node, ast.UnaryOp):
        return ast.UnaryOp(node.op, _desugar(node.operand, expr, what))
    if isinstance(node, ast.BinOp):
        return ast.BinOp(_desugar(node.left, expr, what), node.op, _desugar(node.right, expr, what))
    if not isinstance(node, ast.Call):
        return node
    args = [_desugar(a, expr, what) for a in node.args]
    if node.func.id not in SUGAR:
        return ast.Call(node.func, args, [])
    usage = "write clamp(v, lo, hi), clamp(v, min=lo) or clamp(v, max=hi)"
    if not 1 <= len(args) <= 3 or any(isinstance(a, ast.Starred) for a in node.args):
        raise ValueError(f"{what} {expr!r}: clamp takes a value and up to two bounds; {usage}")
    v, bounds = args[0], dict(zip(("min", "max"), args[1:]))
    for k in node.keywords:
        if k.arg not in ("min", "max") or k.arg in bounds:
            raise ValueError(f"{what} {expr!r}: clamp gets {k.arg or '**'} " + ("twice" if k.arg in bounds else
                             "as a keyword") + f"; {usage}")
        bounds[k.arg] = _desugar(k.value, expr, what)
    if not bounds:
        raise ValueError(f"{what} {expr!r}: clamp without a bound does nothing; {usage}")
    if "min" in bounds:
        v = ast.Call(ast.Name("max", ast.Load()), [v, bounds["min"]], [])
    if "max" in bounds:
        v = ast.Call(ast.Name("min", ast.Load()), [v, bounds["max"]], [])
    return v


def _literals(node: ast.AST, expr: str, what: str) -> ast.AST:
    """``node`` with every subtree that reads no variable (``sigmoid(0)``, ``2 * 3``, ``-1 + 0.5``) folded to the
    number it is, so that every backend sees a literal: a constant bound of ``min``/``max`` is then a clamp
    everywhere (torch.maximum takes no Python number), and generated code calls no function on a number.
    ValueError where such a part is undefined or beyond float32 (every backend would compute inf or NaN there).
    """
    if constant(node) is not None:
        return node
    if not _reads_variable(node):
        if not finite(node, {}):
            raise ValueError(f"{what} {expr!r}: its constant part {ast.unparse(node)!r} is undefined or beyond "
                             "float32's range; write a finite number there")
        return _num(value(node, {}))
    return _with_operands(node, lambda a: _literals(a, expr, what))


def _with_operands(node: ast.AST, fn: Callable[[ast.AST], ast.AST]) -> ast.AST:
    """A new ``node`` whose operands (a unary or binary operation's, a call's arguments) are ``fn`` of its own; a
    name or constant as it is."""
    if isinstance(node, ast.UnaryOp):
        return ast.UnaryOp(node.op, fn(node.operand))
    if isinstance(node, ast.BinOp):
        return ast.BinOp(fn(node.left), node.op, fn(node.right))
    if isinstance(node, ast.Call):
        return ast.Call(node.func, [fn(a) for a in node.args], [])
    return node


def value(tree: ast.AST, env: dict[str, float]) -> float:
    """A validated tree on Python floats (raises ArithmeticError or ValueError where undefined)."""
    if isinstance(tree, ast.Expression):
        return value(tree.body, env)
    if isinstance(tree, ast.Name):
        return env[tree.id]
    if isinstance(tree, ast.Constant):
        return float(tree.value)
    if isinstance(tree, ast.UnaryOp):
        v = value(tree.operand, env)
        return -v if isinstance(tree.op, ast.USub) else v
    if isinstance(tree, ast.BinOp):
        a, b = value(tree.left, env), value(tree.right, env)
        if isinstance(tree.op, ast.Add):
            v = a + b
        elif isinstance(tree.op, ast.Sub):
            v = a - b
        elif isinstance(tree.op, ast.Mult):
            v = a * b
        elif isinstance(tree.op, ast.Div):
            v = a / b
        else:
            v = a ** b
        if isinstance(v, complex):
            raise ValueError("complex power")
        return float(v)
    assert isinstance(tree, ast.Call), f"unvalidated expression node {ast.dump(tree)}"
    if tree.func.id == "_masked_mul":  # the mask first: u may be undefined where v is 0
        v = value(tree.args[1], env)
        return 0.0 if v == 0 else value(tree.args[0], env) * v
    return float(FUNCTIONS[tree.func.id].math(*(value(a, env) for a in tree.args)))


def emit(tree: ast.AST, names: dict[str, str], call: Callable[..., str], special: Any = None) -> str:
    """Source text for a tree, built node by node (never from the expression's text).

    ``names`` spells each variable; ``call(name, *args)`` spells a function call; ``special(node, emit)``
    may spell a node its own way (return None for the default). Operators are fully parenthesised.
    """

    def go(node: ast.AST) -> str:
        if special is not None:
            out = special(node, go)
            if out is not None:
                return out
        if isinstance(node, ast.Expression):
            return go(node.body)
        if isinstance(node, ast.Name):
            return names[node.id]
        if isinstance(node, ast.Constant):
            return repr(float(node.value))
        if isinstance(node, ast.UnaryOp):
            return f"({'-' if isinstance(node.op, ast.USub) else '+'}{go(node.operand)})"
        if isinstance(node, ast.BinOp):
            return f"({go(node.left)} {_OPS[type(node.op)]} {go(node.right)})"
        if isinstance(node, ast.Call):
            return call(node.func.id, *(go(a) for a in node.args))
        raise ValueError(f"{type(node).__name__} is not part of an expression")

    return go(tree)


def _number(code: str) -> bool:
    try:
        float(code.strip("()"))
    except ValueError:
        return False
    return True


def torch_call(name: str, *args: str) -> str:
    """A function call in generated torch code (``emit``'s ``call``); ``min``/``max`` against a constant are
    ``torch.clamp`` (torch.minimum takes tensors only), which also keeps the gradient on the input at a tie, as
    the language says."""
    if name in ("min", "max") and any(_number(a) for a in args):
        a, b = args
        if _number(a) and _number(b):
            return f"{name}({a}, {b})"
        v, c = (b, a) if _number(a) else (a, b)
        return f"torch.clamp({v}, {'max' if name == 'min' else 'min'}={c.strip('()')})"
    return FUNCTIONS[name].torch.format(*args)


# ----------------------------------------------------------------------------------------------
# Bounds over intervals
# ----------------------------------------------------------------------------------------------

_ANY = (-math.inf, math.inf)


def _side(f: Callable[..., float], args: tuple[float, ...], fallback: float) -> float:
    """f(*args) for one side of an interval; ``fallback`` (a bound that always holds) where f overflows or is
    undefined there."""
    try:
        v = float(f(*args))
    except (ArithmeticError, ValueError):
        return fallback
    return fallback if math.isnan(v) else v


def _times(a: float, b: float) -> float:
    """A product of interval ends: 0 times an infinite end is 0 (the end bounds finite values)."""
    return 0.0 if a == 0 or b == 0 else a * b


def _product(p: tuple[float, float], q: tuple[float, float]) -> tuple[float, float]:
    ends = [_times(a, b) for a in p for b in q]
    return min(ends), max(ends)


def _even(f: Callable[[float], float], p: tuple[float, float], least: float) -> tuple[float, float]:
    """Bounds of an even function rising away from 0 (abs, square) over the interval ``p``."""
    lo, hi = p
    top = max(_side(f, (lo,), math.inf), _side(f, (hi,), math.inf))
    if lo >= 0:
        return _side(f, (lo,), least), top
    if hi <= 0:
        return _side(f, (hi,), least), top
    return _side(f, (0.0,), least), top


def _power(base: tuple[float, float], e: tuple[float, float]) -> tuple[float, float]:
    """Bounds of base ** e (torch's meaning: a real power of a negative base for an integer exponent only)."""
    lo, hi = base
    if e[0] == e[1]:
        c = e[0]
        if c == 0:
            return 1.0, 1.0
        if c.is_integer() and c > 0:
            power = lambda v: v ** c  # noqa: E731
            if c % 2 == 0:
                return _even(power, base, 0.0)
            return _side(power, (lo,), -math.inf), _side(power, (hi,), math.inf)
        if c.is_integer() and (lo > 0 or hi < 0):  # 1 / base ** -c, a base of one sign
            d = _power(base, (-c, -c))
            return (1 / d[1], 1 / d[0]) if d[0] > 0 or d[1] < 0 else _ANY
        if not c.is_integer():  # real only where the base is >= 0
            if hi < 0:
                return _ANY
            lo = max(lo, 0.0)
            ends = (_side(pow, (lo, c), math.inf), _side(pow, (hi, c), math.inf))
            return min(ends), max(ends)
        return _ANY
    if lo > 0:  # exp(e * log(base))
        return _call_bounds("exp", [_product(e, _call_bounds("log", [base]))])
    return (0.0, math.inf) if lo >= 0 else _ANY


def _call_bounds(name: str, args: list[tuple[float, float]]) -> tuple[float, float]:
    f = FUNCTIONS[name]
    if f.shape == "rising":
        lo = _side(f.math, tuple(a[0] for a in args), f.least)
        hi = _side(f.math, tuple(a[1] for a in args), math.inf)
    elif f.shape == "even":
        lo, hi = _even(f.math, args[0], f.least)
    else:
        lo, hi = _ANY
    return max(lo, f.least), hi


def bounds(tree: ast.AST, box: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """(lo, hi) with lo <= the tree's value <= hi wherever it is defined, for every point of ``box`` (an
    interval per variable): interval arithmetic over the tree, in float64. Sound but not tight: a
    variable read twice is taken as two independent ones (``x - x`` is bounded by the interval's width),
    except a product of a subtree with itself, which is a square."""
    if isinstance(tree, ast.Expression):
        return bounds(tree.body, box)
    if isinstance(tree, ast.Name):
        return box[tree.id]
    if isinstance(tree, ast.Constant):
        return float(tree.value), float(tree.value)
    if isinstance(tree, ast.UnaryOp):
        lo, hi = bounds(tree.operand, box)
        return (-hi, -lo) if isinstance(tree.op, ast.USub) else (lo, hi)
    if isinstance(tree, ast.Call):
        return _call_bounds(tree.func.id, [bounds(a, box) for a in tree.args])
    assert isinstance(tree, ast.BinOp), f"unvalidated expression node {ast.dump(tree)}"
    p = bounds(tree.left, box)
    if isinstance(tree.op, ast.Mult) and ast.dump(tree.left) == ast.dump(tree.right):
        return _even(FUNCTIONS["square"].math, p, 0.0)
    q = bounds(tree.right, box)
    if isinstance(tree.op, ast.Add):
        lo, hi = p[0] + q[0], p[1] + q[1]
    elif isinstance(tree.op, ast.Sub):
        lo, hi = p[0] - q[1], p[1] - q[0]
    elif isinstance(tree.op, ast.Mult):
        lo, hi = _product(p, q)
    elif isinstance(tree.op, ast.Div):
        lo, hi = _product(p, (1 / q[1], 1 / q[0])) if q[0] > 0 or q[1] < 0 else _ANY
    else:
        lo, hi = _power(p, q)
    return (-math.inf if math.isnan(lo) else lo), (math.inf if math.isnan(hi) else hi)


# ----------------------------------------------------------------------------------------------
# Symbolic derivative
# ----------------------------------------------------------------------------------------------


def _const(node: ast.AST) -> float | None:
    return float(node.value) if isinstance(node, ast.Constant) else None


def constant(node: ast.AST) -> float | None:
    """The value of a constant or of a negated constant (how ``_num`` writes negative numbers), else None. In a
    parsed tree every part that reads no variable is one (``parse`` folds them)."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        c = _const(node.operand)
        return None if c is None else -c
    return _const(node)


def _num(v: float) -> ast.AST:
    return ast.UnaryOp(ast.USub(), ast.Constant(-v)) if v < 0 else ast.Constant(v)


def _bin(op: ast.operator, a: ast.AST, b: ast.AST) -> ast.AST:
    """a op b, simplified where one side is a constant (so derivatives stay as small as hand-written ones)."""
    ca, cb = constant(a), constant(b)
    if ca is not None and cb is not None and not isinstance(op, ast.Pow):
        try:
            return _num(value(ast.BinOp(ast.Constant(ca), op, ast.Constant(cb)), {}))
        except (ArithmeticError, ValueError):
            pass
    if isinstance(op, ast.Add):
        if ca == 0:
            return b
        if cb == 0:
            return a
    elif isinstance(op, ast.Sub):
        if cb == 0:
            return a
        if ca == 0:
            return _neg(b)
    elif isinstance(op, ast.Mult):
        if ca == 0 or cb == 0:
            return ast.Constant(0.0)
        if ca == 1:
            return b
        if cb == 1:
            return a
    elif isinstance(op, ast.Div):
        if ca == 0:
            return ast.Constant(0.0)
        if cb == 1:
            return a
    elif isinstance(op, ast.Pow):
        if cb == 1:
            return a
        if cb == 0:
            return ast.Constant(1.0)
    return ast.BinOp(a, op, b)


def _neg(a: ast.AST) -> ast.AST:
    c = _const(a)
    if c is not None:
        return _num(-c)
    if isinstance(a, ast.UnaryOp) and isinstance(a.op, ast.USub):
        return a.operand
    return ast.UnaryOp(ast.USub(), a)


def _substitute(tree: ast.AST, var: str, arg: ast.AST) -> ast.AST:
    """``tree`` with every ``var`` replaced by ``arg`` (a new tree; ``arg`` is shared, not copied)."""
    if isinstance(tree, ast.Expression):
        return _substitute(tree.body, var, arg)
    if isinstance(tree, ast.Name):
        return arg if tree.id == var else tree
    return _with_operands(tree, lambda a: _substitute(a, var, arg))


def _can_be_infinite(node: ast.AST) -> bool:
    """Whether a derivative factor may be infinite or undefined where its value is (a division, a log, a
    power with an exponent that is not a constant >= 0)."""
    for n in ast.walk(node):
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div):
            return True
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow):
            c = constant(n.right)
            if c is None or c < 0:
                return True
        if isinstance(n, ast.Call) and n.func.id == "log":
            return True
    return False


def _chain(outer: ast.AST, inner: ast.AST) -> ast.AST:
    """outer * inner for the chain rule: 0 where ``inner`` is 0 when ``outer`` may be infinite there (torch's
    relu / clamp backwards mask the gradient: d sqrt(relu(x)) / dx is 0 at x <= 0, not inf * 0)."""
    if constant(inner) is not None or not _can_be_infinite(outer):
        return _bin(ast.Mult(), outer, inner)
    return ast.Call(ast.Name("_masked_mul", ast.Load()), [outer, inner], [])


def _reads_variable(node: ast.AST) -> bool:
    """Whether a subtree reads a variable (else it is a constant, a Python float where the expression runs)."""
    if isinstance(node, ast.Name):
        return True
    children = node.args if isinstance(node, ast.Call) else ast.iter_child_nodes(node)
    return any(_reads_variable(c) for c in children)


def _d(node: ast.AST, var: str) -> ast.AST:
    if isinstance(node, ast.Expression):
        return _d(node.body, var)
    if isinstance(node, ast.Name):
        return ast.Constant(1.0 if node.id == var else 0.0)
    if isinstance(node, ast.Constant):
        return ast.Constant(0.0)
    if isinstance(node, ast.UnaryOp):
        d = _d(node.operand, var)
        return _neg(d) if isinstance(node.op, ast.USub) else d
    if isinstance(node, ast.Call):
        # Chain rule over the arguments: the sum of d f / d arg_i * d arg_i / d var.
        f = FUNCTIONS[node.func.id]
        args, grads = node.args, (f.grad, f.grad2)
        if f.clamp_grad is not None and not all(map(_reads_variable, args)):
            # min/max against a constant bound is a clamp: the input (put first, as u) has the only derivative.
            args, grads = sorted(args, key=lambda a: not _reads_variable(a)), (f.clamp_grad,)
        total: ast.AST = ast.Constant(0.0)
        for grad, arg in zip(grads, args):
            da = _d(arg, var)
            if grad is None or _const(da) == 0:
                continue
            outer: ast.AST = ast.parse(grad, mode="eval")
            for u, a in zip(("u", "v"), args):
                outer = _substitute(outer, u, a)
            total = _bin(ast.Add(), total, _chain(_fold(outer), da))
        return total
    assert isinstance(node, ast.BinOp), f"unvalidated expression node {ast.dump(node)}"
    a, b = node.left, node.right
    da, db = _d(a, var), _d(b, var)
    if isinstance(node.op, (ast.Add, ast.Sub)):
        return _bin(node.op, da, db)
    if isinstance(node.op, ast.Mult):
        return _bin(ast.Add(), _bin(ast.Mult(), da, b), _bin(ast.Mult(), a, db))
    if isinstance(node.op, ast.Div):
        num = _bin(ast.Sub(), _bin(ast.Mult(), da, b), _bin(ast.Mult(), a, db))
        return _bin(ast.Div(), num, _bin(ast.Pow(), b, ast.Constant(2.0)))
    # Power: a constant exponent c gives c a^(c-1) da; otherwise b a^(b-1) da + a^b log(a) db, where
    # a^b log(a) is 0 at a^b = 0 (as torch's pow backward takes it at a = 0).
    c = _const(_fold(b))
    if c is not None:
        return _chain(_bin(ast.Mult(), ast.Constant(c), _bin(ast.Pow(), a, ast.Constant(c - 1))), da)
    log_a = ast.Call(ast.Name("_masked_mul", ast.Load()), [ast.Call(ast.Name("log", ast.Load()), [a], []), node], [])
    d_base = _chain(_bin(ast.Mult(), b, _bin(ast.Pow(), a, _bin(ast.Sub(), b, ast.Constant(1.0)))), da)
    return _bin(ast.Add(), d_base, _chain(log_a, db))


def _fold(node: ast.AST) -> ast.AST:
    """Constant subtrees folded and trivial operations dropped (``_bin``'s rules), bottom-up."""
    if isinstance(node, ast.Expression):
        return ast.Expression(_fold(node.body))
    if isinstance(node, ast.BinOp):
        return _bin(node.op, _fold(node.left), _fold(node.right))
    if isinstance(node, ast.UnaryOp):
        inner = _fold(node.operand)
        return _neg(inner) if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.Call):
        return ast.Call(node.func, [_fold(a) for a in node.args], [])
    return node


def derivative(tree: ast.AST, var: str) -> ast.Expression:
    """d tree / d var as a new (simplified) tree in the same language."""
    return ast.Expression(_fold(_d(tree, var)))


# ----------------------------------------------------------------------------------------------
# Straight-line programs (common subexpressions once)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Program:
    """Several trees as one list of steps, each subexpression computed once.

    ``steps[i]`` is ("var", name) | ("const", value) | ("neg", j) | ("call", fname, j[, k]) |
    ("bin", "+"/"-"/"*"/"/"/"**", j, k), reading earlier steps j, k; ``outputs`` index the trees' values.
    """

    steps: tuple[tuple, ...]
    outputs: tuple[int, ...]

    def run(self, env: dict[str, Any], call: Callable[[str, Any], Any], binop: Callable[[str, Any, Any], Any]) -> list:
        """Evaluate with ``call(fname, *values)`` and ``binop(op, a, b)`` (torch, floats, ...); returns the outputs."""
        vals: list[Any] = []
        for s in self.steps:
            kind = s[0]
            if kind == "var":
                vals.append(env[s[1]])
            elif kind == "const":
                vals.append(s[1])
            elif kind == "neg":
                vals.append(-vals[s[1]])
            elif kind == "call":
                vals.append(call(s[1], *(vals[j] for j in s[2:])))
            else:
                vals.append(binop(s[1], vals[s[2]], vals[s[3]]))
        return [vals[i] for i in self.outputs]

    def source(self, names: dict[str, str], call: Callable[..., str], pow_: Callable[[str, float | None, str], str],
               prefix: str = "t") -> tuple[list[str], list[str]]:
        """(assignment lines, output expressions) spelling the program in some language's source.

        Constants and variables are spelled inline; every other step is one assignment ``{prefix}{i}``.
        ``pow_(base, exponent_constant_or_None, exponent)`` spells a power.
        """
        spelled: list[str] = []
        lines: list[str] = []
        for i, s in enumerate(self.steps):
            kind = s[0]
            if kind == "var":
                spelled.append(names[s[1]])
                continue
            if kind == "const":
                spelled.append(repr(float(s[1])))
                continue
            if kind == "neg":
                code = f"-{spelled[s[1]]}"
            elif kind == "call":
                code = call(s[1], *(spelled[j] for j in s[2:]))
            elif s[1] == "**":
                c = self.steps[s[3]]
                code = pow_(spelled[s[2]], float(c[1]) if c[0] == "const" else None, spelled[s[3]])
            else:
                code = f"{spelled[s[2]]} {s[1]} {spelled[s[3]]}"
            lines.append(f"{prefix}{i} = {code}")
            spelled.append(f"{prefix}{i}")
        return lines, [spelled[i] for i in self.outputs]


def program(trees: list[ast.AST]) -> Program:
    """The trees as one ``Program`` (structurally equal subtrees become one step)."""
    steps: list[tuple] = []
    seen: dict[tuple, int] = {}

    def add(step: tuple) -> int:
        if step not in seen:
            seen[step] = len(steps)
            steps.append(step)
        return seen[step]

    def go(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return go(node.body)
        if isinstance(node, ast.Name):
            return add(("var", node.id))
        if isinstance(node, ast.Constant):
            return add(("const", float(node.value)))
        if isinstance(node, ast.UnaryOp):
            inner = go(node.operand)
            if isinstance(node.op, ast.UAdd):
                return inner
            if steps[inner][0] == "const":
                return add(("const", -steps[inner][1]))
            return add(("neg", inner))
        if isinstance(node, ast.Call):
            return add(("call", node.func.id, *(go(a) for a in node.args)))
        assert isinstance(node, ast.BinOp), f"unvalidated expression node {ast.dump(node)}"
        return add(("bin", _OPS[type(node.op)], go(node.left), go(node.right)))

    outputs = tuple(go(_fold(t)) for t in trees)
    return Program(tuple(steps), outputs)
