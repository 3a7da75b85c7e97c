"""The meaning of routing and experts, defined once for every backend.

- ``expr``: the small elementwise expression language (parse once, then values, torch and Triton
  source, symbolic derivatives, straight-line programs with shared subexpressions).
- ``scores``: the router score functions (named scores, custom expressions of the logit ``x``).
- ``activations``: the expert activations, each an expression of ``gate`` and ``up`` (gated) or ``x``.
- ``dtypes``: spec dtype names, torch dtypes and byte sizes.
- ``combine``: how the shared experts' output joins the routed one (an expression of ``routed`` and
  ``shared``; the sum by default).
- ``torch_forms`` and ``routing`` (import torch): activations forward/backward and scores on tensors;
  the torch reference of top-k routing used by the tests, the HF importer and the Triton fallback.

Adding an activation or a score touches this package only. For example, GPT-OSS's clamped SwiGLU
variant and a square-root sigmoid score are one entry each::

    # activations.py, in ACTIVATIONS
    "swiglu_oai": Activation("swiglu_oai", "gate * sigmoid(1.702 * gate) * (up + 1)", True),
    # scores.py, in SCORE_FUNCTIONS
    "sqrt_sigmoid": "sqrt(sigmoid(x))",

(or, from user code, ``register_activation("swiglu_oai", "gate * sigmoid(1.702 * gate) * (up + 1)")``
and ``register_score("sqrt_sigmoid", "sqrt(sigmoid(x))")``). The spec then accepts
``activation: swiglu_oai`` (with ``gate_clamp``/``up_clamp`` for its clamps) and ``score:
sqrt_sigmoid``. A spec may also write the activation inline, clamps included (``activation: "(clamp(up,
-7, 7) + 1) * clamp(gate, max=7) * sigmoid(1.702 * clamp(gate, max=7))"``), as it may a score; the generated torch layer, the expert op's forward and backward (the derivative is
taken from the expression), the Triton kernels and the torch reference routing all follow from the
entry. ``tests/test_semantics.py`` (torch layer, forward and backward) and ``tests/test_triton.py``
(kernels) add such entries and check them on every backend.

This package sits with the spec at the bottom of the stack: ``__init__`` and the table modules do not
import torch.
"""

from __future__ import annotations

from .activations import ACTIVATIONS, Activation, activation, register_activation
from .dtypes import DTYPE_BYTES, DTYPES, dtype_name, torch_dtype
from .scores import SCORE_FUNCTIONS, register_score, score_expression, score_tree

__all__ = ["ACTIVATIONS", "Activation", "activation", "register_activation", "DTYPES", "DTYPE_BYTES", "dtype_name",
           "torch_dtype", "SCORE_FUNCTIONS", "register_score", "score_expression", "score_tree"]
