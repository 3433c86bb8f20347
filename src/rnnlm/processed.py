"""The tokenize stage's outputs, read back: one reader for each file, which checks it.

train (through the datamodule), export and evaluate read the vocabulary, the tokenizer and the
id streams here and nowhere else, so a wrong file is refused in one line that names it and what
is wrong, never trained on or scored as garbage:

    read_vocab(paths)               vocab.json: {"tokens": [...]}, unique strings, <unk> and
                                    <eos> first
    read_tokenizer(paths)           tokenizer.json: a TextTokenizer's dict
    read_split(paths, split, size)  <split>.npy: a non-empty 1-D integer array of ids in
                                    [0, size), as int64
    read_split_rule(paths)          splits.json's `split_by`: the split rule that ran
"""

from __future__ import annotations

import typing
from typing import Any

import numpy as np

from rnnlm.config import Paths, SplitRule
from rnnlm.errors import RnnlmError, short_repr
from rnnlm.files import read_json
from rnnlm.streams import SPECIAL_TOKENS, check_token_ids

RERUN = "run the tokenize stage first"


class ProcessedDataError(RnnlmError):
    """A tokenize output is missing or is not what the tokenize stage writes."""


def _json(path: Any) -> Any:
    try:
        return read_json(path)
    except FileNotFoundError:
        raise ProcessedDataError(f"{path}: not found ({RERUN})") from None
    except ValueError as err:
        raise ProcessedDataError(f"{err} ({RERUN})") from None


def read_vocab(paths: Paths) -> list[str]:
    """The tokens in id order."""
    path = paths.vocab
    data = _json(path)
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ProcessedDataError(
            f'{path}: expected {{"tokens": [strings]}}, not a vocabulary file ({RERUN})'
        )
    if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
        raise ProcessedDataError(
            f"{path}: the vocabulary must start with {', '.join(SPECIAL_TOKENS)}, starts with "
            f"{tokens[: len(SPECIAL_TOKENS)]} ({RERUN})"
        )
    if len(set(tokens)) != len(tokens):
        raise ProcessedDataError(f"{path}: the vocabulary lists a token twice ({RERUN})")
    return tokens


def read_tokenizer(paths: Paths) -> dict[str, Any]:
    """The tokenizer's dict (as stored in the ONNX metadata), checked by building it."""
    path = paths.tokenizer
    data = _json(path)
    from rnnlm.text import TextTokenizer  # NLTK: only the stages that tokenize pay its import

    try:
        TextTokenizer.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ProcessedDataError(f"{path}: not a tokenizer file ({err!r}; {RERUN})") from None
    return dict(data)


def read_split(paths: Paths, split: str, vocab_size: int) -> np.ndarray:
    """The ids of `split` as int64, refused unless 1-D, integer, non-empty and in range."""
    path = paths.split_ids(split)
    try:
        ids = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ProcessedDataError(f"{path}: not found ({RERUN})") from None
    except (ValueError, OSError, EOFError) as err:  # truncated, not .npy, a pickled object
        raise ProcessedDataError(f"{path}: not a .npy array ({err}; {RERUN})") from None
    try:
        return check_token_ids(ids, vocab_size)
    except ValueError as err:
        message = str(err).removeprefix("stream: ")
        if ids.size == 0:
            message = "the split is empty"
        raise ProcessedDataError(
            f"{path}: {message} (vocabulary of {vocab_size}; {RERUN})"
        ) from None


SPLIT_RULES: tuple[str, ...] = typing.get_args(SplitRule)


def read_split_rule(paths: Paths) -> str:
    """Which split rule the tokenize stage ran: `document` or `span` (for the MLflow run)."""
    path = paths.splits
    data = _json(path)
    rule = data.get("split_by") if isinstance(data, dict) else None
    if rule not in SPLIT_RULES:
        raise ProcessedDataError(
            f"{path}: split_by = {short_repr(rule)}, expected one of {', '.join(SPLIT_RULES)} "
            f"({RERUN})"
        )
    return str(rule)
