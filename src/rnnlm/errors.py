"""The one base class of the failures rnnlm expects, and how their messages show values.

Every expected failure (a bad param, a missing or malformed input, an unusable tracking store,
a model that fails its checks, an interrupted training) is an `RnnlmError`: a stage's `main`
and the `rnnlm` command report it as one line and exit with its `exit_code`. Anything else is a
bug and keeps its traceback. No imports beyond the standard library: the torch-free inference
path uses it too.
"""

from __future__ import annotations


class RnnlmError(Exception):
    """An expected failure, reported in one line; `exit_code` is the process's exit status."""

    exit_code = 1


def short_repr(value: object, width: int = 60) -> str:
    """repr(value), cut to `width` characters: an error message stays one short line."""
    text = repr(value)
    return text if len(text) <= width else f"{text[: width - 3]}..."
