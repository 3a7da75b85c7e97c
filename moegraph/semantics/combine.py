"""How the shared experts' output joins the routed experts' output: ``shared_experts.combine``.

A layer with shared experts returns ``routed + shared`` by default (DeepSeek, Qwen2-MoE: a sum).
Other combinations are elementwise expressions of the two ``[T, D]`` outputs in the expression
language of ``semantics.expr``: an average ``0.5 * (routed + shared)``, a fixed weighting
``routed + 0.25 * shared``, or a gated one ``routed + sigmoid(shared) * shared``. ``routed`` is the
routed experts' weighted sum (identity experts included), ``shared`` the shared experts' output after
their own gate, if any. The expression is parsed once; the generated layer spells it in torch, so
autograd differentiates it like the code around it.
"""

from __future__ import annotations

import ast
import functools

from . import expr as _expr

__all__ = ["DEFAULT_COMBINE", "COMBINE_LANGUAGE", "combine_tree", "check_combine", "is_sum", "torch_combine_code"]

#: the combination every spec had before the field existed (and the default)
DEFAULT_COMBINE = "routed + shared"

#: points where a combination must be finite: outputs as large as float32 layers produce
_PROBE = tuple((r, s) for r in (-1e3, -30.0, -1.0, 0.0, 0.5, 30.0, 1e3) for s in (-1e3, -30.0, -1.0, 0.0, 2.0, 1e3))

COMBINE_LANGUAGE = _expr.Language(
    what="shared_experts.combine expression", variables=("routed", "shared"),
    functions=(*_expr.CALLABLE, *_expr.SUGAR), max_length=200,
    of="routed and shared (the two [T, D] outputs)", names_hint="'routed' and 'shared'",
    uses_hint="'routed' and 'shared'", example="0.5 * (routed + shared)", probe=_PROBE,
    probe_hint="a combination must be finite for ordinary outputs; guard it (e.g. log(shared) -> log(1 + abs(shared)))",
)


@functools.lru_cache(maxsize=64)
def combine_tree(expression: str) -> ast.Expression:
    """The validated tree of a combination (ValueError naming the problem and the fix otherwise)."""
    tree = _expr.parse(expression, COMBINE_LANGUAGE)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    for name, why in (("routed", "the routed experts would compute nothing the layer returns"),
                      ("shared", "the shared experts would compute nothing the layer returns")):
        if name not in used:
            raise ValueError(f"{COMBINE_LANGUAGE.what} {expression!r} does not use {name!r}: {why}; "
                             f"write both, e.g. {COMBINE_LANGUAGE.example!r}")
    return tree


def check_combine(expression: str) -> str:
    """The expression, validated and returned unchanged (ValueError otherwise)."""
    combine_tree(expression)
    return expression


def is_sum(expression: str) -> bool:
    """Whether the combination is the plain sum (the generated code then adds, as it always has)."""
    return ast.dump(combine_tree(expression)) == ast.dump(combine_tree(DEFAULT_COMBINE))


def torch_combine_code(expression: str, routed: str, shared: str) -> str:
    """Generated torch code for the combination of the tensors spelled ``routed`` and ``shared``."""
    tree = combine_tree(expression)
    code = _expr.emit(tree, {"routed": routed, "shared": shared}, _expr.torch_call)
    return code[1:-1] if isinstance(tree.body, (ast.BinOp, ast.UnaryOp)) and code.startswith("(") else code
