"""Opaque custom ops defined without importing ``torch._dynamo`` on their first call.

``torch.library.custom_op`` wraps every kernel in ``torch._disable_dynamo``, which imports
``torch._dynamo`` (and with it much of Inductor) the first time the kernel runs: 1.5-2 s spent on
the first forward of a layer even when nothing is compiled. The wrapper only matters while Dynamo
is evaluating frames, which it can only do once ``torch._dynamo`` has been imported. So ``opaque_op``
defines the op with the public ``torch.library`` pieces (``Library.define`` with the inferred
schema, ``Library.impl``, ``register_fake``, ``register_autograd``) and gives it a kernel that
looks the Dynamo-disabled wrapper up only when ``torch._dynamo`` is already loaded; otherwise it
calls the function directly. Under ``torch.compile`` the op behaves as a ``custom_op`` does: opaque,
traced through its fake implementation, pt2-compliant, and never traced into.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

__all__ = ["OpaqueOp", "opaque_op", "save_inputs", "saved_inputs"]

# Libraries must outlive the module-level names that refer to their ops.
_LIBRARIES: dict[str, torch.library.Library] = {}


def _library(namespace: str) -> torch.library.Library:
    if namespace not in _LIBRARIES:
        _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    return _LIBRARIES[namespace]


class _LazyNoDynamoKernel:
    """Calls ``fn``; through ``torch._dynamo.disable(fn)`` once Dynamo is loaded (as custom_op does)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.disabled: Callable | None = None

    def __call__(self, *args, **kwargs):
        if self.disabled is None:
            if "torch._dynamo" not in sys.modules:
                return self.fn(*args, **kwargs)
            import torch._dynamo

            self.disabled = torch._dynamo.disable(self.fn, recursive=True)
        return self.disabled(*args, **kwargs)


class OpaqueOp:
    """A defined op: callable like the function, with ``register_fake``/``register_autograd``."""

    def __init__(self, qualname: str, fn: Callable):
        namespace, name = qualname.split("::")
        self.qualname = qualname
        self._lib = _library(namespace)
        schema = torch.library.infer_schema(fn, mutates_args=())
        self._lib.define(name + schema, tags=(torch.Tag.pt2_compliant_tag,))
        self._lib.impl(name, _LazyNoDynamoKernel(fn), "CompositeExplicitAutograd")
        self._op = getattr(getattr(torch.ops, namespace), name).default
        self.__doc__ = fn.__doc__
        self.__name__ = name

    def __call__(self, *args, **kwargs):
        return self._op(*args, **kwargs)

    def register_fake(self, fn: Callable) -> Callable:
        torch.library.register_fake(self.qualname, fn, lib=self._lib)
        return fn

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=self._lib)


def opaque_op(qualname: str, fn: Callable | None = None):
    """Define ``qualname`` ("namespace::name") with ``fn``'s signature; usable as a decorator."""
    if fn is None:
        return lambda f: OpaqueOp(qualname, f)
    return OpaqueOp(qualname, fn)


def _version(t) -> int | None:
    try:
        return t._version if isinstance(t, torch.Tensor) else None
    except RuntimeError:  # an inference tensor keeps no version counter
        return None


def save_inputs(ctx, inputs: tuple) -> None:
    """Keep an op's inputs for its backward (``setup_context``) with their version counters, the check that
    ``ctx.save_for_backward`` makes for autograd's own functions."""
    ctx.inputs = inputs
    ctx.input_versions = tuple(_version(t) for t in inputs)


def saved_inputs(ctx, op: str, names: tuple[str, ...]) -> tuple:
    """The inputs ``save_inputs`` kept, refused if any was changed in place since the forward: its backward
    would differentiate other values than the forward computed (expert weights moved by ``apply_plan``, or
    an optimizer step, between a forward and its backward)."""
    for i, (t, v) in enumerate(zip(ctx.inputs, ctx.input_versions)):
        if v is not None and _version(t) != v:
            name = names[i] if i < len(names) else f"input {i}"
            raise RuntimeError(
                f"{op}: {name} was modified in place between the forward and its backward (by apply_plan, an "
                "optimizer step or a weight load); run backward before changing the weights, or forward again")
    return ctx.inputs
