"""A small native (C) kernel for decode-sized expert compute, compiled on first use.

At a handful of tokens the expert layer is bound by reading the touched experts' weights, and
torch's matrix-vector products read them at a fraction of the memory bandwidth (FP8 weights first
have to be dequantized by torch in full passes over memory). The kernel here reads each touched
expert's weights once, converts them in registers (FP8 e4m3fn / e5m2 to bfloat16 for FP8 x FP8 dot
products, or to float32 times their block scales; bfloat16 to float32), and fuses the up projection,
the activation, the down projection and the routing-weighted sum into one call
(``codegen_templates/native_decode.c.j2``).

Where x and every weight share one dtype (float32, or bfloat16 without FP8), ``mg_decode_fused`` runs
the shared expert and the routed experts in one call (one parallel region instead of two), and bfloat16
weights meet the bfloat16 inputs in AVX512-BF16 dot products instead of being widened to float32.

A second entry point, ``mg_bf16_experts``, runs bfloat16 experts over expert-sorted rows (the
``native_bf16`` strategy, for a few to a few dozen rows per expert): four weight rows meet four rows at
a time in AVX512-BF16 dot products (exact bfloat16 products, float32 sums), so each expert's weights
are read once for all its rows without a GEMM call per expert.

It is one more expert strategy (``strategies``: ``native``) and one more path of the FP8 op
(``moegraph.fp8``), for at most ``strategies.DECODE_MAX_TOKENS`` tokens, chosen by measurement
(``moegraph.tuning``) so it runs only where it wins. It is forward only: gradients always come from
the torch backward of the op (which recomputes what it needs from the op's inputs).

Build: the kernel's C source is rendered per activation (the activation is spelled in C from its
expression: ``semantics.expr.C_SPELLINGS``), compiled with the system C compiler (``$CC``, else
``cc``; ``-O3 -march=native -fopenmp -shared -fPIC``) into a cache folder, keyed by the source,
compiler, flags and CPU identity (model, every feature flag, and what -march=native means to the
compiler there), and loaded with ctypes; a second process loads the cached library
without compiling. Plain C without torch headers, so it compiles in well under a second. Without a
working compiler (or when compiling fails, or the cache folder cannot be written) it warns once and
every caller uses its torch path.

Numerics: float32 accumulation. Activations are rounded through FP8 tiles exactly as
``fp8.fake_quant_tiles``. Where the CPU has AVX512-BF16 and AVX512-VBMI (``mg_fp8_dot()`` is 1), FP8
weights meet the activations' FP8 values directly: both are exact in bfloat16 and their products exact
in float32, so each chunk of a block and tile is summed unscaled (``vdpbf16ps``) and scaled once by the
weight block's and the activation tile's scales. Elsewhere FP8 weights are dequantized exactly as
``fp8.dequantize_blocks`` (q * scale_inv rounded once). Either way only the order of the float32 sums
(and where the scales are applied) differs from torch's.

Legend: T tokens, D model dim, F expert hidden dim, H up rows (2F gated, else F), E experts, N assignments.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shlex
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from . import semantics
from .codegen_safe import Code
from .errors import InputError
from .ops.args import ExpertArgs
from .semantics.expr import C_SPELLINGS

__all__ = ["FLAGS", "ABI_VERSION", "set_cache_dir", "cache_dir", "compiler", "source", "kernel", "available",
           "supports", "fp8_supports", "run_experts", "run_supported", "run_fp8", "run_fp8_supported", "warn_once",
           "NativeUnavailable", "bf16_supports", "bf16_kernel", "run_bf16_rows"]

#: Bumped when the C function's signature changes (a cached library of another version is rebuilt).
ABI_VERSION = 1

#: Compiler flags (after the compiler command from $CC).
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")

#: Tensor dtype -> the kernel's dtype code (x, weights, biases).
_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}
_FP8_FMT = {"fp8_e4m3": 2, "fp8_e5m2": 3}
_ERRORS = {-1: "out of memory", -2: "a token index is outside [0, T)", -3: "inconsistent sizes"}


class NativeUnavailable(RuntimeError):
    """The native kernel cannot be built or loaded here (callers use their torch path). ``fix``: what the
    user can do about it (the last sentence of the one warning)."""

    fix = "Install a C compiler with OpenMP (gcc) or point $CC at one."

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        if fix is not None:
            self.fix = fix


#: the fix a cache folder that cannot be written names
CACHE_FIX = ("Point moegraph.native.set_cache_dir (the moegraph command: $XDG_CACHE_HOME) at a writable "
             "folder.")


def _unwritable(folder: Path, exc: OSError | None = None) -> NativeUnavailable:
    why = f" ({exc.strerror or exc})" if exc is not None else ""
    return NativeUnavailable(f"the native kernel cache folder {folder} cannot be written{why}", CACHE_FIX)


_cache_dir: Path | None = None


def set_cache_dir(path: str | Path | None) -> None:
    """Keep compiled kernels in ``path`` (None: ``<codegen cache>/../native``, i.e. ~/.cache/moegraph/native)."""
    global _cache_dir
    _cache_dir = None if path is None else Path(path)
    _LOADED.clear()


def cache_dir() -> Path:
    from .codegen import default_cache_dir

    return _cache_dir if _cache_dir is not None else default_cache_dir().parent / "native"


def compiler() -> list[str]:
    """The C compiler command: $CC (split like a shell word list), else ``cc``."""
    return shlex.split(os.environ.get("CC") or "cc")


def _act_c(act: semantics.Activation) -> tuple[list[Code], Code]:
    def call(name: str, *args: str) -> str:
        return C_SPELLINGS[name].format(*args)

    def pow_(base: str, c: float | None, exponent: str) -> str:
        if c is not None and c.is_integer() and 1 <= c <= 8:
            return " * ".join([base] * int(c))
        return f"powf({base}, {exponent})"

    lines, (out,) = act.forward_program.source({v: v for v in act.variables}, call, pow_)
    return [Code(line) for line in lines], Code(out)


def source(act: semantics.Activation) -> str:
    """The kernel's C source for one activation."""
    from .codegen import template_env

    lines, out = _act_c(act)
    return template_env().get_template("native_decode.c.j2").render(
        act_name=act.name, gated=act.gated, act_lines=lines, act_out=out, abi_version=ABI_VERSION)


@lru_cache(maxsize=None)
def _compiler_version(cc: tuple[str, ...]) -> str:
    try:
        out = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"C compiler {' '.join(cc)!r} does not run ({exc})") from None
    if out.returncode != 0:
        raise NativeUnavailable(f"C compiler {' '.join(cc)!r} does not run ({out.stderr.strip()[:200]})")
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"


@lru_cache(maxsize=None)
def _native_target(cc: tuple[str, ...]) -> str:
    """What ``-march=native`` makes of this CPU for this compiler (gcc: ``-march=<cpu> -m<ext> ...`` with
    its cache sizes; clang: ``-target-cpu`` and ``-target-feature``s), read from its ``-###`` dry run;
    empty where it prints none."""
    try:
        out = subprocess.run([*cc, "-march=native", "-###", "-E", "-x", "c", os.devnull], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    kept = []
    for line in (out.stderr + out.stdout).splitlines():
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        kept += [w for i, w in enumerate(words) if (w.startswith("-m") and not w.startswith("-main-file-name"))
                 or (i and words[i - 1] in ("-target-cpu", "-target-feature", "--param"))]
    return " ".join(kept)


def _library_path(src: str, cc: list[str], kind: str) -> Path:
    """The cache file of this source built by ``cc``: keyed by everything the binary depends on, the CPU
    included (``-march=native`` builds for this CPU's extensions: a library built on a CPU with AVX512-VBMI
    would die of an illegal instruction on one without, so two machines sharing a cache folder must not
    share a file): its model, every feature flag it reports and the compiler's own reading of it."""
    from .tuning import _cpuinfo

    model, _, flags = _cpuinfo()
    key = "\n".join([src, " ".join(cc), _compiler_version(tuple(cc)), " ".join(FLAGS), model, " ".join(flags),
                     _native_target(tuple(cc))])
    return cache_dir() / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.so"


def _compile(src: str, cc: list[str], path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only ~/.cache (containers, shared accounts): no kernel, never a crash
        raise _unwritable(path.parent, exc) from None
    if not os.access(path.parent, os.W_OK):
        raise _unwritable(path.parent)
    with tempfile.TemporaryDirectory(prefix="moegraph-native-") as tmp:
        c_file = Path(tmp) / "kernel.c"
        c_file.write_text(src, encoding="utf-8")
        so_tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        try:
            try:
                out = subprocess.run([*cc, *FLAGS, "-o", str(so_tmp), str(c_file), "-lm"], capture_output=True,
                                     text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as exc:
                raise NativeUnavailable(f"C compiler {' '.join(cc)!r} failed to run ({exc})") from None
            if out.returncode != 0:
                raise NativeUnavailable(f"compiling the native kernel with {' '.join(cc)!r} failed: "
                                        f"{(out.stderr or out.stdout).strip()[:400]}")
            os.replace(so_tmp, path)  # a reader never sees half a library
        finally:  # a failed, timed-out or interrupted build leaves nothing in the cache (after the rename: nothing)
            with contextlib.suppress(OSError):
                so_tmp.unlink(missing_ok=True)


_LOADED: dict[tuple, ctypes.CDLL | NativeUnavailable] = {}
_LOCK = threading.Lock()
_WARNED: set[str] = set()
#: compilations done by this process (tests check that a cached kernel is not compiled again)
compiled_paths: list[Path] = []


def _load(act: semantics.Activation) -> ctypes.CDLL:
    return _load_library("decode", (act.name, act.expression, act.gated), lambda: source(act), _open)


def _load_library(kind: str, what: tuple, make_source: Callable[[], str],
                  opener: Callable[[Path], ctypes.CDLL]) -> ctypes.CDLL:
    """The ``kind`` library of ``make_source()`` (``what`` tells its sources apart), loaded once per
    process and compiled once per machine (a file ``<kind>-<hash>.so`` in ``cache_dir()``)."""
    from . import codegen

    # The memo key holds what compiler() and cache_dir() derive from, read cheaply: this runs on every
    # decode call, and resolving the cache folder alone took longer than a dict lookup by far.
    key = (kind, *what, os.environ.get("CC"), os.environ.get("HOME"), _cache_dir, codegen._cache_dir)
    hit = _LOADED.get(key)
    if hit is None:
        hit = _load_locked(key, make_source, opener)
    if isinstance(hit, NativeUnavailable):
        raise hit
    return hit


def _load_locked(key: tuple, make_source: Callable[[], str],
                 opener: Callable[[Path], ctypes.CDLL]) -> ctypes.CDLL | NativeUnavailable:
    cc = compiler()
    with _LOCK:
        hit = _LOADED.get(key)
        if hit is None:
            try:
                src = make_source()
                path = _library_path(src, cc, key[0])
                try:
                    hit = opener(path) if path.exists() else None
                except NativeUnavailable:
                    hit = None  # a damaged cached library: built again below
                if hit is None:
                    path.unlink(missing_ok=True)
                    _compile(src, cc, path)
                    compiled_paths.append(path)
                    hit = opener(path)
            except NativeUnavailable as exc:
                hit = exc
            except OSError as exc:  # the cache folder cannot be searched or written (or the temporary folder)
                hit = _unwritable(cache_dir(), exc)
            _LOADED[key] = hit
    return hit


def _cdll(path: Path, kind: str, version_symbol: str, version: int) -> ctypes.CDLL:
    """The library at ``path`` where its ``version_symbol()`` says ``version`` (else NativeUnavailable)."""
    try:
        lib = ctypes.CDLL(str(path))
        if getattr(lib, version_symbol)() != version:
            raise OSError("ABI version differs")
    except (OSError, AttributeError) as exc:
        raise NativeUnavailable(f"cannot load the {kind} kernel {path} ({exc})") from None
    return lib


def _open(path: Path) -> ctypes.CDLL:
    lib = _cdll(path, "decode", "mg_abi_version", ABI_VERSION)
    _declare(lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32, f32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    lib.mg_decode.restype = i32
    lib.mg_decode.argtypes = [i64, i64, i64, i64, p, i32,  # T D F E x x_dt
                              i64, p, p, p,  # n tok exp wgt
                              p, p, i32, p, p, i64, i64,  # w_up w_down w_dt s_up s_down bo bi
                              p, p, i32, i32, f32, i32, f32,  # b_up b_down b_dt gate/up clamps
                              i64, i32, i32, p, i32]  # tile act_dt ue8m0 y32 threads
    lib.mg_decode_fused.restype = i32
    lib.mg_decode_fused.argtypes = [i64, i64, i64, i64, p, i32,  # T D F E x dt
                                    i64, p, p, p, p, p, p, p, i32,  # n tok exp wgt w_up w_down b_up b_down b_dt
                                    i64, p, p, p,  # S w_sup w_sdown s_scale
                                    i32, f32, i32, f32, p, i32]  # gate/up clamps y32 threads
    lib.mg_bf16_dot.restype = i32
    lib.mg_bf16_experts.restype = i32
    lib.mg_bf16_experts.argtypes = [i64, i64, i64, i64, p, p, p,  # E D F n x cnt wgt
                                    p, p, p, p, i32, i32, f32, i32, f32,  # w_up w_down b_up b_down b_dt clamps
                                    p, p, i32]  # o h_out threads


def warn_once(message: str) -> None:
    """A RuntimeWarning, once per process for each message."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def kernel(act: semantics.Activation) -> ctypes.CDLL | None:
    """The loaded kernel for ``act``, built on first use; None (after one warning) where it cannot be."""
    try:
        return _load(act)
    except NativeUnavailable as exc:
        warn_once(f"moegraph's native decode kernel is unavailable, decode-sized batches use the torch paths: "
                  f"{exc}. {exc.fix}")
        return None


def available(activation: str = "swiglu", gated: bool | None = None) -> bool:
    """Whether the kernel for this activation builds and loads here (builds it on first call)."""
    return kernel(semantics.activation(activation, gated)) is not None


# ----------------------------------------------------------------------------------------------
# Calling it
# ----------------------------------------------------------------------------------------------


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check_weight(name: str, w: Tensor, shape: tuple[int, ...], allowed) -> str | None:
    if w.dtype not in allowed:
        return f"{name} has dtype {w.dtype}; the native kernel reads {', '.join(str(d) for d in allowed)}"
    if tuple(w.shape) != shape:
        return f"{name} has shape {tuple(w.shape)}, expected {shape}"
    if w.device.type != "cpu":
        return f"{name} is on {w.device}; the native kernel runs on the CPU"
    if not w.is_contiguous():
        return f"{name} is not contiguous (strides {w.stride()}); pass .contiguous() weights"
    return None


def _check_common(x_TD, tok_N, exp_N, weight_N, w_up, w_down, b_up, b_down, gated, weight_dtypes) -> str | None:
    if x_TD.dim() != 2 or x_TD.dtype not in (torch.float32, torch.bfloat16) or x_TD.device.type != "cpu":
        return f"x_TD must be a 2-D float32 or bfloat16 CPU tensor (got {tuple(x_TD.shape)} {x_TD.dtype} {x_TD.device})"
    if w_up.dim() != 3 or w_down.dim() != 3:
        return f"w_up_EHD and w_down_EDF must be 3-D (got {tuple(w_up.shape)} and {tuple(w_down.shape)})"
    E, D, F = w_up.shape[0], x_TD.shape[1], w_down.shape[2]
    H = (2 if gated else 1) * F
    why = (_check_weight("w_up_EHD", w_up, (E, H, D), weight_dtypes)
           or _check_weight("w_down_EDF", w_down, (E, D, F), weight_dtypes))
    if why:
        return why
    for name, b, shape in (("b_up_EH", b_up, (E, H)), ("b_down_ED", b_down, (E, D))):
        if b is not None:
            why = _check_weight(name, b, shape, (torch.float32, torch.bfloat16))
            if why:
                return why
    if b_up is not None and b_down is not None and b_up.dtype != b_down.dtype:
        return f"b_up_EH ({b_up.dtype}) and b_down_ED ({b_down.dtype}) differ in dtype"
    for name, t in (("tok_N", tok_N), ("exp_N", exp_N)):
        if t.dtype != torch.int64 or t.dim() != 1:
            return f"{name} must be a 1-D int64 tensor (got {tuple(t.shape)} {t.dtype})"
    if exp_N.shape != tok_N.shape or weight_N.shape != tok_N.shape or not weight_N.is_floating_point():
        return (f"tok_N, exp_N and weight_N must be 1-D of one length, weight_N floating (got {tuple(tok_N.shape)}, "
                f"{tuple(exp_N.shape)}, {tuple(weight_N.shape)} {weight_N.dtype})")
    return None


def supports(args: ExpertArgs) -> str | None:
    """Why the native kernel cannot run the expert op's call ``args`` (None when it can)."""
    a = args
    why = _check_common(a.x_TD, a.tok_N, a.exp_N, a.weight_N, a.w_up_EHD, a.w_down_EDF, a.b_up_EH, a.b_down_ED,
                        a.act.gated, (torch.float32, torch.bfloat16))
    if why or a.shared_w_up_HD is None:
        return why
    S = a.shared_w_down_DF.shape[-1] if a.shared_w_down_DF.dim() == 2 else -1
    D = a.x_TD.shape[1]
    return (_check_weight("shared_w_up_HD", a.shared_w_up_HD, ((2 if a.act.gated else 1) * S, D),
                          (torch.float32, torch.bfloat16))
            or _check_weight("shared_w_down_DF", a.shared_w_down_DF, (D, S), (torch.float32, torch.bfloat16)))


def _bias_args(b_up: Tensor | None, b_down: Tensor | None) -> tuple:
    """The kernels' bias arguments: the two pointers (NULL for none) and the biases' dtype code."""
    present = b_up if b_up is not None else b_down
    return _ptr(b_up), _ptr(b_down), _DT[present.dtype] if present is not None else 0


def _clamp_args(act_args: tuple) -> tuple:
    """The kernels' clamp arguments from ``ExpertArgs.activation_args``: (has, value) for gate and up."""
    _, _, gate_clamp, up_clamp = act_args
    return (gate_clamp is not None, 0.0 if gate_clamp is None else gate_clamp,
            up_clamp is not None, 0.0 if up_clamp is None else up_clamp)


def _call(lib, y32, x, n, tok, exp, wgt, w_up, w_down, s_up, s_down, block, b_up, b_down, act_args, fp8,
          threads: int | None = None) -> None:
    if x.shape[0] == 0 or (tok is not None and n == 0):
        # No tokens or no assignments: nothing to add. The kernel must not be called: it refuses T = 0
        # (a rank with no tokens still runs its shared experts' call), and an empty tensor's data_ptr()
        # is 0 while a NULL tok means "every token to expert 0" (the shared-expert call).
        return
    T, D = x.shape
    E, F = w_up.shape[0], w_down.shape[-1]
    tile, fmt, scale_format = fp8 if fp8 else (0, None, "float32")
    rc = lib.mg_decode(T, D, F, E, x.data_ptr(), _DT[x.dtype], n, _ptr(tok), _ptr(exp), _ptr(wgt),
                       w_up.data_ptr(), w_down.data_ptr(), _DT[w_up.dtype], _ptr(s_up), _ptr(s_down), block[0],
                       block[1], *_bias_args(b_up, b_down), *_clamp_args(act_args), tile, _FP8_FMT.get(fmt, 0),
                       scale_format == "ue8m0", y32.data_ptr(), threads or torch.get_num_threads())
    if rc != 0:
        raise InputError(f"native decode kernel refused its inputs: {_ERRORS.get(rc, rc)}")


def _lib_for(act: semantics.Activation):
    lib = kernel(act)
    if lib is None:
        raise NativeUnavailable("the native decode kernel is not available here (see the earlier warning)")
    return lib


def run_experts(args: ExpertArgs | tuple) -> Tensor:
    """The expert op (``moegraph::expert_mlp``) on ``args`` by the native kernel: [T, D] in x's dtype.

    Raises InputError naming the argument when the kernel cannot read the inputs (dtype, shape,
    device, non-contiguous weights), NativeUnavailable when no kernel could be built.
    """
    a = ExpertArgs.of(args)
    why = supports(a)
    if why:
        raise InputError(f"native expert kernel: {why}")
    return run_supported(a, _lib_for(a.act))


def run_supported(a: ExpertArgs, lib: ctypes.CDLL, threads: int | None = None) -> Tensor:
    """``run_experts`` for a call that ``supports`` accepted, with the kernel ``kernel`` returned: for
    a caller that checked both already (the decode strategy, once per call instead of twice).
    ``threads``: the kernel's thread count (None: torch's)."""
    x = a.x_TD.contiguous()
    T, D = x.shape
    y32 = torch.zeros(T, D, dtype=torch.float32)
    act_args = a.activation_args
    if _one_call(a):
        _call_fused(lib, y32, x, a, threads)
        return y32 if x.dtype == torch.float32 else y32.to(x.dtype)
    if a.shared_w_up_HD is not None:
        _call(lib, y32, x, T, None, None, _shared_scale(a, T), a.shared_w_up_HD.unsqueeze(0),
              a.shared_w_down_DF.unsqueeze(0), None, None, (0, 0), None, None, act_args, None, threads)
    tok, exp = a.tok_N.contiguous(), a.exp_N.contiguous()
    wgt = a.weight_N.float().contiguous()
    _call(lib, y32, x, tok.numel(), tok, exp, wgt, a.w_up_EHD, a.w_down_EDF, None, None, (0, 0), a.b_up_EH,
          a.b_down_ED, act_args, None, threads)
    return y32 if x.dtype == torch.float32 else y32.to(x.dtype)


def _shared_scale(a: ExpertArgs, T: int) -> Tensor | None:
    """The shared expert's per-token weights as the kernels read them ([T] float32), None for none."""
    if a.shared_scale_T is None:
        return None
    scale = a.shared_scale_T.reshape(-1).float().contiguous()
    if scale.numel() != T:
        raise InputError(f"native expert kernel: shared_scale_T has {scale.numel()} values for {T} tokens")
    return scale


def _one_call(a: ExpertArgs) -> bool:
    """Whether ``mg_decode_fused`` runs the call: x and every weight of one dtype (float32 or bfloat16)."""
    dt = a.x_TD.dtype
    return (dt in (torch.float32, torch.bfloat16) and a.w_up_EHD.dtype == dt and a.w_down_EDF.dtype == dt
            and (a.shared_w_up_HD is None or (a.shared_w_up_HD.dtype == dt and a.shared_w_down_DF.dtype == dt)))


def _call_fused(lib, y32: Tensor, x: Tensor, a: ExpertArgs, threads: int | None) -> None:
    """The shared and routed experts of ``a`` added into y32 by one ``mg_decode_fused`` call."""
    T = x.shape[0]
    if T == 0:
        return  # no tokens: nothing to add (the kernel refuses T = 0)
    tok, exp = a.tok_N.contiguous(), a.exp_N.contiguous()
    wgt = a.weight_N.float().contiguous()
    s_up, s_down = a.shared_w_up_HD, a.shared_w_down_DF
    S, scale = (s_down.shape[1], _shared_scale(a, T)) if s_up is not None else (0, None)
    rc = lib.mg_decode_fused(T, x.shape[1], a.w_down_EDF.shape[2], a.w_up_EHD.shape[0], x.data_ptr(), _DT[x.dtype],
                             tok.numel(), tok.data_ptr(), exp.data_ptr(), wgt.data_ptr(), a.w_up_EHD.data_ptr(),
                             a.w_down_EDF.data_ptr(), *_bias_args(a.b_up_EH, a.b_down_ED), S, _ptr(s_up),
                             _ptr(s_down), _ptr(scale), *_clamp_args(a.activation_args), y32.data_ptr(),
                             threads or torch.get_num_threads())
    if rc != 0:
        raise InputError(f"native decode kernel refused its inputs: {_ERRORS.get(rc, rc)}")


def fp8_supports(x_TD, tok_N, exp_N, weight_N, w_up_EHD, s_up, w_down_EDF, s_down, b_up_EH, b_down_ED, gated,
                 block, tile) -> str | None:
    """Why the native kernel cannot run this ``fp8_expert_mlp`` call (None when it can): it needs
    stored FP8 weights with their scales (master weights quantized on the fly stay in torch)."""
    why = _check_common(x_TD, tok_N, exp_N, weight_N, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED, gated,
                        (torch.float8_e4m3fn, torch.float8_e5m2))
    if why:
        return why
    if w_up_EHD.dtype != w_down_EDF.dtype:
        return f"w_up_EHD ({w_up_EHD.dtype}) and w_down_EDF ({w_down_EDF.dtype}) differ in FP8 format"
    E, H, D = w_up_EHD.shape
    F = w_down_EDF.shape[2]
    bo, bi = block
    for name, s, w in (("s_up", s_up, w_up_EHD), ("s_down", s_down, w_down_EDF)):
        if s is None:
            return f"{name} is missing (the native kernel reads stored FP8 weights with their scales)"
        want = (w.shape[0], w.shape[1] // bo, w.shape[2] // bi)
        if w.shape[1] % bo or w.shape[2] % bi or tuple(s.shape) != want or s.dtype != torch.float32 \
                or not s.is_contiguous():
            return f"{name} must be a contiguous float32 tensor of shape {want} (got {tuple(s.shape)} {s.dtype})"
    if D % tile or F % tile:
        return f"activation tile {tile} does not divide D={D} and F={F}"
    return None


def run_fp8(x_TD, tok_N, exp_N, weight_N, w_up_EHD, s_up, w_down_EDF, s_down, b_up_EH, b_down_ED, activation, gated,
            gate_clamp, up_clamp, block, tile, fmt, scale_format) -> Tensor:
    """``moegraph::fp8_expert_mlp``'s forward by the native kernel (stored FP8 weights): [T, D] in x's dtype."""
    act = semantics.activation(activation, gated)
    why = fp8_supports(x_TD, tok_N, exp_N, weight_N, w_up_EHD, s_up, w_down_EDF, s_down, b_up_EH, b_down_ED,
                       act.gated, block, tile)
    if why:
        raise InputError(f"native FP8 expert kernel: {why}")
    return run_fp8_supported(x_TD, tok_N, exp_N, weight_N, w_up_EHD, s_up, w_down_EDF, s_down, b_up_EH, b_down_ED,
                             activation, gated, gate_clamp, up_clamp, block, tile, fmt, scale_format)


def run_fp8_supported(x_TD, tok_N, exp_N, weight_N, w_up_EHD, s_up, w_down_EDF, s_down, b_up_EH, b_down_ED, activation,
                      gated, gate_clamp, up_clamp, block, tile, fmt, scale_format) -> Tensor:
    """``run_fp8`` on arguments ``fp8_supports`` has accepted already (the FP8 op checks them once per
    call, then runs this)."""
    if fmt not in _FP8_FMT or scale_format not in ("float32", "ue8m0"):
        raise InputError(f"native FP8 expert kernel: unknown format {fmt!r} / scale format {scale_format!r}")
    lib = _lib_for(semantics.activation(activation, gated))
    x = x_TD.contiguous()
    T, D = x.shape
    y32 = torch.zeros(T, D, dtype=torch.float32)
    tok, exp = tok_N.contiguous(), exp_N.contiguous()
    _call(lib, y32, x, tok.numel(), tok, exp, weight_N.float().contiguous(), w_up_EHD, w_down_EDF, s_up, s_down,
          block, b_up_EH, b_down_ED, (activation, gated, gate_clamp, up_clamp), (tile, fmt, scale_format))
    return y32 if x.dtype == torch.float32 else y32.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# bfloat16 experts over expert-sorted rows (the ``native_bf16`` strategy)
# ----------------------------------------------------------------------------------------------


def bf16_supports(args: ExpertArgs) -> str | None:
    """Why ``mg_bf16_experts`` cannot run the routed experts of ``args`` (None when it can): it reads
    bfloat16 x and weights (contiguous, on the CPU) with D and F multiples of 32."""
    a = args
    if a.x_TD.dtype != torch.bfloat16 or a.w_up_EHD.dtype != torch.bfloat16 or a.w_down_EDF.dtype != torch.bfloat16:
        return (f"x and the expert weights must be bfloat16 (got {a.x_TD.dtype}, {a.w_up_EHD.dtype}, "
                f"{a.w_down_EDF.dtype})")
    why = _check_common(a.x_TD, a.tok_N, a.exp_N, a.weight_N, a.w_up_EHD, a.w_down_EDF, a.b_up_EH, a.b_down_ED,
                        a.act.gated, (torch.bfloat16,))
    if why:
        return why
    D, F = a.x_TD.shape[1], a.w_down_EDF.shape[2]
    if D % 32 or F % 32:
        return f"D={D} and F={F} must be multiples of 32"
    return None


def bf16_kernel(act: semantics.Activation) -> ctypes.CDLL | None:
    """The loaded kernel for ``act`` where it has ``mg_bf16_experts`` (AVX512-BF16 here), else None."""
    lib = kernel(act)
    return lib if lib is not None and lib.mg_bf16_dot() == 1 else None


def run_bf16_rows(lib: ctypes.CDLL, a: ExpertArgs, x_ND: Tensor, counts: list[int], w_sorted_N: Tensor,
                  h_out_NH: Tensor | None = None) -> Tensor:
    """The routed experts on expert-sorted rows x_ND [n, D] (``counts[e]`` rows for expert e, in order)
    with routing weights w_sorted_N [n]: the weighted expert outputs [n, D] in float32, for a call
    ``bf16_supports`` accepted. ``h_out_NH`` (contiguous bfloat16 [n, H]), where given, receives the
    up projection with its bias (what a training forward keeps for the backward)."""
    n, D = x_ND.shape
    o_ND = torch.empty(n, D, dtype=torch.float32)
    if n == 0:
        return o_ND
    x_ND = x_ND.contiguous()
    cnt = torch.tensor(counts, dtype=torch.int64)
    wgt = w_sorted_N.float().contiguous()
    rc = lib.mg_bf16_experts(a.w_up_EHD.shape[0], D, a.w_down_EDF.shape[2], n, x_ND.data_ptr(), cnt.data_ptr(),
                             wgt.data_ptr(), a.w_up_EHD.data_ptr(), a.w_down_EDF.data_ptr(),
                             *_bias_args(a.b_up_EH, a.b_down_ED), *_clamp_args(a.activation_args), o_ND.data_ptr(),
                             _ptr(h_out_NH), torch.get_num_threads())
    if rc != 0:
        raise InputError(f"native bfloat16 expert kernel refused its inputs: {_ERRORS.get(rc, rc)}")
    return o_ND


# ----------------------------------------------------------------------------------------------
# Router selection (``mg_route_select``, ``codegen_templates/native_router.c.j2``)
# ----------------------------------------------------------------------------------------------

#: Bumped when ``mg_route_select``'s signature changes.
ROUTER_ABI_VERSION = 1


def router_source() -> str:
    """The router selection kernel's C source."""
    from .codegen import template_env

    return template_env().get_template("native_router.c.j2").render(abi_version=ROUTER_ABI_VERSION)


def _open_router(path: Path) -> ctypes.CDLL:
    lib = _cdll(path, "router", "mg_router_abi_version", ROUTER_ABI_VERSION)
    i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.mg_route_select.restype = i32
    lib.mg_route_select.argtypes = [i64, i64, p, p, i64, i64, i64, i32, p, p, i32]  # T E s bias K G KG gsum ids w nt
    return lib


def router_kernel() -> ctypes.CDLL | None:
    """The loaded router selection kernel, built on first use; None (after one warning) where it cannot be."""
    try:
        return _load_library("router", (), router_source, _open_router)
    except NativeUnavailable as exc:
        warn_once(f"moegraph's native router kernel is unavailable, routing runs as torch steps: {exc}. {exc.fix}")
        return None


def _group_sum(num_groups: int, group_score: str, top_n: int) -> int | None:
    """The kernel's group score code: 0 the maximum (or a sum of one), 2 the sum of the best two; None
    for sums of more (torch's order of summing them is its own)."""
    if num_groups == 0 or group_score == "max" or top_n == 1:
        return 0
    return 2 if group_score == "sum_topn" and top_n == 2 else None


def select_supported(num_groups: int, group_score: str, top_n: int) -> bool:
    """Whether the kernel computes this group limit (every top-k does; group sums of at most two)."""
    return _group_sum(num_groups, group_score, top_n) is not None


def route_select(scores_TE: Tensor, expert_bias_E: Tensor | None, top_k: int, num_groups: int, topk_groups: int,
                 group_score: str, top_n: int) -> tuple[Tensor, Tensor] | None:
    """The native expert choice: ids_TK [T, K] int64 (best first) and the chosen experts' scores [T, K];
    None where torch's steps must run instead (inputs other than contiguous float32 CPU tensors, a group
    sum of more than two, no kernel here, or a token whose choice torch's order among equal values decides).
    """
    gsum = _group_sum(num_groups, group_score, top_n)
    if (gsum is None or scores_TE.dtype is not torch.float32 or not scores_TE.is_cpu or scores_TE.dim() != 2
            or not scores_TE.is_contiguous()):
        return None
    T, E = scores_TE.shape
    if expert_bias_E is not None and (expert_bias_E.dtype is not torch.float32 or not expert_bias_E.is_cpu
                                      or expert_bias_E.shape != (E,) or not expert_bias_E.is_contiguous()):
        return None
    lib = router_kernel()
    if lib is None:
        return None
    ids_TK = torch.empty(T, top_k, dtype=torch.int64)
    w_TK = torch.empty(T, top_k, dtype=torch.float32)
    rc = lib.mg_route_select(T, E, scores_TE.data_ptr(), _ptr(expert_bias_E), top_k, num_groups, topk_groups, gsum,
                             ids_TK.data_ptr(), w_TK.data_ptr(), torch.get_num_threads())
    if rc < 0:
        raise InputError(f"native router kernel refused its inputs ({T} x {E} scores, top_k {top_k}, "
                         f"{num_groups} groups keep {topk_groups}): {_ERRORS.get(rc, rc)}")
    return (ids_TK, w_TK) if rc == 0 else None
