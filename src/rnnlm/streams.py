"""Token streams: the conventions training, evaluation, the baselines and inference share.

A split, or a text to score, is one stream of token ids in which every sentence ends with
`<eos>` (id 1); words outside the vocabulary are `<unk>` (id 0). This module is the one home of
those ids and of what is done with such a stream, in numpy only (no NLTK, no torch: training,
the baselines and the torch-free inference path import it):

    lm_pairs(stream[, prev])  inputs `<eos>` (or the token before) + stream[:-1], targets the
                              stream: every token is predicted, the first from a boundary
    padded_history(stream, n) n `<eos>` then the stream: an n-gram model's context at the start
    batchify(array, n_rows)   contiguous rows of equal length (the tail dropped)
    shard_rows(n_rows, r, w)  the rows process r of w owns under DDP
    check_token_ids(...)      a 1-D integer stream of ids in range, or ValueError saying why
    split_stats(ids, n_docs)  documents, sentences, tokens and OOV rate of a split
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from rnnlm.errors import short_repr

# The vocabulary starts with these two, in this order: `<unk>` stands for every word outside
# it, `<eos>` ends every sentence (and starts every stream, see lm_pairs).
UNK = "<unk>"
EOS = "<eos>"
SPECIAL_TOKENS = (UNK, EOS)
UNK_ID = 0
EOS_ID = 1


def lm_pairs(stream: np.ndarray, previous: int = EOS_ID) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (`previous` then the stream minus its last token) and targets (the stream),
    int64. `previous` is the token before the stream: `<eos>` at its start, the last target of
    the window before when a stream is fed a window at a time."""
    stream = np.asarray(stream, dtype=np.int64)
    inputs = np.concatenate([np.array([previous], dtype=np.int64), stream[:-1]])
    return inputs, stream


def padded_history(stream: np.ndarray, n: int) -> np.ndarray:
    """`n` `<eos>` ids, then `stream` (int64): the history a stream starts from."""
    return np.concatenate([np.full(n, EOS_ID, dtype=np.int64), np.asarray(stream, np.int64)])


def batchify(array: np.ndarray, n_rows: int) -> np.ndarray:
    """(n,) -> (n_rows, n // n_rows): contiguous pieces of the stream, one a row.

    The last n % n_rows tokens are dropped so that the rows have equal length.
    """
    length = len(array) // n_rows
    if length < 1:
        raise ValueError(f"a stream of {len(array)} tokens cannot feed {n_rows} parallel rows")
    return array[: n_rows * length].reshape(n_rows, length)


def shard_rows(n_rows: int, rank: int, world_size: int) -> slice:
    """The rows a process owns under DDP: contiguous, as even as possible."""
    per_rank, extra = divmod(n_rows, world_size)
    start = rank * per_rank + min(rank, extra)
    return slice(start, start + per_rank + (1 if rank < extra else 0))


def check_token_ids(
    stream: Iterable[int] | np.ndarray, vocab_size: int, *, allow_empty: bool = False
) -> np.ndarray:
    """`stream` as a 1-D int64 array of ids in [0, vocab_size); ValueError saying what is wrong.

    Floats are refused rather than truncated: 1.7 is no token id.
    """
    try:
        ids = np.asarray(stream if isinstance(stream, np.ndarray) else list(stream))
    except (TypeError, ValueError) as err:  # not iterable, ragged nesting
        raise ValueError(
            f"stream = {short_repr(stream)}: expected a sequence of token ids ({err})"
        ) from None
    if ids.ndim != 1:
        raise ValueError(f"stream: expected one 1-D sequence of token ids, got shape {ids.shape}")
    if ids.size == 0:
        if allow_empty:
            return ids.astype(np.int64)
        raise ValueError("nothing to score: the stream is empty")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"stream: token ids must be integers, got dtype {ids.dtype}")
    low, high = ids.min(), ids.max()
    if low < 0 or high >= vocab_size:
        raise ValueError(f"stream: token ids must lie in [0, {vocab_size}), got {low}..{high}")
    return ids.astype(np.int64, copy=False)


def split_stats(ids: np.ndarray, n_docs: int) -> dict[str, float | int]:
    """Counts and OOV rate (share of word tokens, `<eos>` excluded, that are `<unk>`)."""
    n_sentences = int(np.count_nonzero(ids == EOS_ID))
    n_words = len(ids) - n_sentences
    n_unk = int(np.count_nonzero(ids == UNK_ID))
    return {
        "documents": n_docs,
        "sentences": n_sentences,
        "tokens": len(ids),
        "oov_rate": round(n_unk / n_words, 6) if n_words else 0.0,
    }
