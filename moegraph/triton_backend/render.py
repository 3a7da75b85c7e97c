"""Render a Triton kernel template into an importable module, cached by content hash.

``render_to_module("triton_router.py.j2", ctx)`` renders the template with ``StrictUndefined`` (a
missing context key is an error), writes the source to ``<cache>/triton/<stem>_<sha12>.py`` only when
no file with that content exists, and imports it once per process. Triton's ``@jit`` reads a kernel's
source from its file, so kernels must be imported from disk rather than exec'd from a string.

Whether a kernel is interpreted (``TRITON_INTERPRET=1``) is decided by Triton when its module is
imported, so the in-process cache is keyed by the content hash and that mode. (The variable must
also be set before triton itself is imported, for Triton's own library functions.)
"""

from __future__ import annotations

import hashlib
import threading
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import jinja2

from .. import __version__
from ..codegen import default_cache_dir, import_generated, template_env, write_atomic
from ..codegen_safe import check_module
from ..errors import CodegenError, InputError

_MODULES: dict[tuple[str, bool], ModuleType] = {}
_LOCK = threading.Lock()


def render(template: str, ctx: dict[str, Any]) -> str:
    """The source of ``template`` for ``ctx`` (the moegraph version and a context summary are added)."""
    # The decisions the file is specialised to, for the reader of the generated header.
    line = ", ".join(f"{k}={v!r}" for k, v in sorted(ctx.items()) if k not in ("summary", "score_code", "dot_args", "act_args", "act_lines", "act_out"))
    try:
        source = template_env().get_template(template).render(version=__version__, context_line=line, **ctx)
    except jinja2.TemplateError as exc:
        raise CodegenError(f"rendering {template} failed: {exc}") from exc
    check_module(source, f"generated {template}")
    return source


def kernel_cache_dir() -> Path:
    return default_cache_dir() / "triton"


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1, read by Triton itself).

    Triton reads the variable twice: when ``triton.language`` is imported (its own @jit library
    functions, such as the combine functions of ``tl.cumsum``, are built for the interpreter or the
    compiler then) and when each kernel module is imported (``knobs.runtime.interpret``). A variable
    set or cleared in between makes kernels that cannot call the library ("Cannot call @triton.jit'd
    outside of the scope of a kernel"): refused here, naming the fix.
    """
    from triton import knobs

    now = bool(knobs.runtime.interpret)
    at_import = _library_interpreted()
    if at_import is not None and now != at_import:
        if now:
            raise InputError(
                "TRITON_INTERPRET=1 was set after triton was imported (torch._dynamo and torch.compile import it "
                "too), so Triton's own library was built for the GPU compiler and the triton backend cannot run "
                "in the interpreter; set TRITON_INTERPRET=1 before anything imports triton or torch._dynamo "
                "(first thing in the script, or in the shell)")
        raise InputError(
            "TRITON_INTERPRET was cleared after triton was imported with it, so Triton's own library runs only "
            "in the interpreter; leave TRITON_INTERPRET=1 set, or clear it before anything imports triton")
    return now


@lru_cache(maxsize=1)
def _library_interpreted() -> bool | None:
    """Whether Triton built its own @jit library functions for the interpreter (decided once, when
    ``triton.language`` was imported); None when the installed triton has none to tell by."""
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    kinds = {isinstance(v, InterpretedFunction) for v in vars(std).values()
             if isinstance(v, (InterpretedFunction, JITFunction))}
    return kinds.pop() if len(kinds) == 1 else None


def _write_if_changed(path: Path, source: str) -> None:
    write_atomic(path, source, what="generated Triton kernels",
                 fix="point moegraph.codegen.set_cache_dir (or, for the CLI, XDG_CACHE_HOME) at a writable directory")


def render_to_module(template: str, ctx: dict[str, Any], cache_dir: str | Path | None = None) -> ModuleType:
    """Render ``template`` with ``ctx`` and import the result (once per content hash and mode)."""
    source = render(template, ctx)
    digest = hashlib.sha256(source.encode()).hexdigest()
    key = (digest, interpreting())
    mod = _MODULES.get(key)
    if mod is not None:
        return mod
    with _LOCK:
        mod = _MODULES.get(key)
        if mod is not None:
            return mod
        stem = template.split(".", 1)[0]
        path = Path(cache_dir) if cache_dir is not None else kernel_cache_dir()
        path = path / f"{stem}_{digest[:12]}.py"
        _write_if_changed(path, source)
        name = f"moegraph_kernels_{stem}_{digest[:16]}" + ("_interpreted" if key[1] else "")
        mod = import_generated(path, name, "generated Triton kernels", source)
        _MODULES[key] = mod
        return mod
