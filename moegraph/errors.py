"""One small error hierarchy for every stage.

A message names the input (file or argument), the field or path, what was wrong and what to do.
The CLI prints these without a traceback and exits non-zero.
"""

from __future__ import annotations

import difflib
import math
import reprlib
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


class MoegraphError(Exception):
    """Base class of every error moegraph raises on purpose."""


def describe(value: Any) -> str:
    """A value of the wrong type as an error message shows it: an array by its shape (never whole), anything
    else by its type and the start of its repr."""
    if isinstance(value, np.ndarray):
        return f"a numpy array of shape {list(value.shape)}"
    return f"{type(value).__name__} {short_repr(value)}"


def is_integer(value: Any, lo: float = -math.inf, hi: float = math.inf) -> bool:
    """Whether an argument is a whole number in [lo, hi]: Python's or numpy's integers, not a bool (True is 1 to
    Python, never a count to a user), a float (2.5 would be truncated somewhere) or a string."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and lo <= value <= hi


def is_number(value: Any, lo: float = -math.inf, hi: float = math.inf) -> bool:
    """Whether an argument is a finite real number in [lo, hi]: one a float holds (it is used as one: an integer
    past 1e308 is not), not a bool, NaN, infinity or a string."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value)) and lo <= value <= hi
    except OverflowError:
        return False


_CONTAINER_REPR = reprlib.Repr()  # (keyword arguments from Python 3.12 only)
_CONTAINER_REPR.maxlevel = 3
_CONTAINER_REPR.maxlist = _CONTAINER_REPR.maxtuple = _CONTAINER_REPR.maxdict = 8
_CONTAINER_REPR.maxset = _CONTAINER_REPR.maxfrozenset = 8
_CONTAINER_REPR.maxstring = _CONTAINER_REPR.maxother = 40


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` as a message echoes a value: at most about ``limit`` characters (a huge integer by its
    number of digits; its repr would be hundreds of characters, or refused beyond Python's digit limit)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3 * limit:
        return f"{'-' if value < 0 else ''}<about {int(value.bit_length() * 0.30103) + 1} digits>"
    # a container by its first entries only (reprlib): a whole repr of a YAML alias bomb's billions never ends
    text = _CONTAINER_REPR.repr(value) if isinstance(value, (list, tuple, dict, set, frozenset)) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def close_names(word: str, names: Iterable[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """The names ``word`` is closest to, best first, for a "did you mean" hint (difflib's ratio, at least
    ``cutoff``). A name that ``word`` only pads with whitespace comes first whatever the ratio, which counts
    the padding against it: ``' relu '`` scores 0.8 against 'relu', ``'  gelu  '`` only 0.67, below a longer
    name's score or the cutoff."""
    names = list(names)
    close = difflib.get_close_matches(word, names, n=n, cutoff=cutoff)
    bare = word.strip()
    if bare != word and bare in names:
        close = [bare] + [c for c in close if c != bare]
    return close[:n]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input: where it is and what to do about it."""

    path: str  # dotted field path inside the input, e.g. "moe.router.top_k"
    message: str

    def render(self, source: str | None = None) -> str:
        where = f"{source}: " if source else ""
        at = self.path or "<root>"
        return f"{where}{at}: {self.message}"


#: the most problems one input's report lists (a generated file can hold a million wrong entries); the rest are
#: counted in one line
MAX_PROBLEMS = 50


def more_problems(count: int) -> str:
    """The line that stands for ``count`` problems left out of a report."""
    return f"and {count} more problem(s) not listed; fix the ones above and check again"


class SpecError(MoegraphError, ValueError):
    """A spec file or dict is not a valid MoE spec. Holds one Problem per thing wrong."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(p.render(self.source) for p in self.problems)


class PlanInfeasible(MoegraphError, ValueError):
    """The placement request cannot be met (too few slots, too little memory, ...)."""


class TraceError(MoegraphError, ValueError):
    """A routing trace is missing, truncated, corrupt or does not fit the spec."""


class PlanFileError(MoegraphError, ValueError):
    """A plan file is corrupt, of another version, or does not match the spec."""


class CodegenError(MoegraphError, RuntimeError):
    """Code generation failed (bad template context, unwritable output directory, ...)."""


class InputError(MoegraphError, ValueError):
    """A tensor handed to a compiled layer (or an argument of ``compile``) has the wrong shape, dtype,
    device, type or range."""


class DistributedError(MoegraphError, RuntimeError):
    """Expert-parallel execution cannot start or a peer failed."""


class OptimizeError(MoegraphError, RuntimeError):
    """A model could not be optimised (block swap refused, verification failed, ...)."""


class UnsupportedBlock(MoegraphError, ValueError):
    """A model's MoE block (Hugging Face or a user's own) cannot be expressed as a moegraph spec.

    ``reason`` says which feature is missing or what could not be explained; ``block`` names the
    block (class or module path) when known.
    """

    def __init__(self, reason: str, block: str | None = None):
        self.reason = reason
        self.block = block
        super().__init__(f"{block}: {reason}" if block else reason)


class ResourceError(MoegraphError, RuntimeError):
    """A request would need more memory (or another resource) than the machine has; refused before
    allocating, with the figure and what to change."""


class MissingDependency(MoegraphError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, purpose: str, otherwise: str = ""):
    """Import ``module`` or raise ``MissingDependency`` saying ``pip install 'moegraph[extra]'``.

    ``otherwise`` names what the user can do instead (e.g. a flag that skips the feature).
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{purpose} needs {module.split('.')[0]}, which is not installed: "
                                f"pip install 'moegraph[{extra}]'" + (f" ({otherwise})" if otherwise else "")) from None
