"""The one base class of the failures rnnlm expects, how their messages show values, and the
checks of a value's kind that come before them.

Every expected failure (a bad param, a missing or malformed input, an unusable tracking store,
a model that fails its checks, an interrupted training) is an `RnnlmError`: a stage's `main`
and the `rnnlm` command report it as one line and exit with its `exit_code`. Anything else is a
bug and keeps its traceback. No imports beyond the standard library: the torch-free inference
path uses it too.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any


class RnnlmError(Exception):
    """An expected failure, reported in one line; `exit_code` is the process's exit status."""

    exit_code = 1


def is_int(value: object) -> bool:
    """A whole number (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def short_repr(value: object, width: int = 60, show: Callable[[Any], str] = repr) -> str:
    """repr(value) (or `show(value)`), cut to `width` characters: an error message stays one
    short line."""
    text = show(value)
    return text if len(text) <= width else f"{text[: width - 3]}..."


def format_duration(seconds: float) -> str:
    """12 s, 4 min 05 s, 2 h 03 min; '?' when unknown (progress and throughput lines)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
