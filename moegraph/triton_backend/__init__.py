"""The Triton backend: kernels rendered from ``codegen_templates/triton_*.py.j2``, specialised to
the spec, launched from opaque custom ops (``torch.ops.moegraph_triton.*``).

Modules:
- ``render``:  Jinja -> Python source -> imported kernel module, cached by content hash.
- ``configs``: block sizes keyed by (experts, hidden size, dtype, device), with a default.
- ``kernels``: the launchers (alignment, grouped expert MLP, combine, router).
- ``ops``:     ``moegraph_triton::expert_mlp``, ``moegraph_triton::fp8_expert_mlp`` (FP8 specs) and
               ``moegraph_triton::route_topk``.
- ``passes``:  ``FuseRouter``, the FX pass that swaps the torch routing subgraph for the router kernel.

Kernels run on CUDA devices, and on CPU under Triton's interpreter: ``TRITON_INTERPRET=1`` set
before triton is first imported (Triton's own @jit library functions are created at that import);
the interpreter has no bfloat16.
"""

from __future__ import annotations

from ..errors import CodegenError

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only where triton is missing
    raise CodegenError(
        f"backend 'triton' needs the triton package, which cannot be imported ({exc}); install it with "
        "`pip install 'moegraph[triton]'` or compile with backend='torch'"
    ) from exc

__all__ = ["CodegenError"]
