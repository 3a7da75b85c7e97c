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

import inspect
import sys
from typing import Callable

import torch

__all__ = ["OpaqueOp", "opaque_op"]

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
        self._arg_names = tuple(inspect.signature(fn).parameters)

    def __call__(self, *args, **kwargs):
        return self._op(*args, **kwargs)

    def register_fake(self, fn: Callable) -> Callable:
        torch.library.register_fake(self.qualname, fn, lib=self._lib)
        return fn

    def register_autograd(self, backward: Callable, *, setup_context: Callable, check_versions: bool = False) -> None:
        """``check_versions``: for a ``setup_context`` that keeps the inputs themselves (not through
        ``ctx.save_for_backward``), the version check that ``save_for_backward`` makes: the backward refuses a
        tensor input changed in place since the forward, since it would differentiate other values than the
        forward computed (expert weights moved by ``apply_plan``, or an optimizer step, between the two)."""
        if check_versions:
            backward, setup_context = _version_checked(self.__name__, self._arg_names, backward, setup_context)
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


def _version_checked(op: str, names: tuple[str, ...], backward: Callable, setup_context: Callable):
    """(backward, setup_context) with ``OpaqueOp.register_autograd``'s version check around them."""

    def setup(ctx, inputs, output):
        ctx.input_versions = [(name, t, v) for name, t in zip(names, inputs) if (v := _version(t)) is not None]
        setup_context(ctx, inputs, output)

    def checked(ctx, *grads):
        for name, t, version in ctx.input_versions:
            if _version(t) != version:
                raise RuntimeError(
                    f"{op} backward: {name} was modified in place between the forward and its backward (by apply_plan, "
                    "an optimizer step or a weight load); run backward before changing the weights, or forward again")
        return backward(ctx, *grads)

    return checked, setup
